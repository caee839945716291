"""reports/index.html's all-runs table, conclusion flags and research-notes section, built from
tiny hand-made report and run folders (dbkit.index_tables through dbkit.runner.build_index)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dbkit import config, index_tables, report, runner

BASE = yaml.safe_load(config.BASE_PATH.read_text(encoding="utf-8"))


def _run(project: Path, rel: str, changes: dict) -> str:
    """A run folder whose params.yaml is base.yaml with dotted `changes` applied."""
    params = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
    (project / rel).mkdir(parents=True)
    (project / rel / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return rel


def _report(project: Path, name: str, rows: list[dict], notes: dict, params_file: str = "", **extra) -> None:
    version = project / "reports" / name / "0123456789ab"
    report.write_summary(version, {"experiment": name, "notes": notes, "rows": rows, "hash": "0123456789abcdef",
                                   "params_file": params_file, "metrics": {}, **extra})
    (version / "index.html").write_text("<html></html>", encoding="utf-8")
    (version / "version.json").write_text(json.dumps({"status": "ok"}), encoding="utf-8")


@pytest.fixture()
def project(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "proj"
    a = _run(root, "runs/exp-a/aaaa", {"experiment": "exp-a", "notes.hypothesis": "changed prose",
                                       "train.lora.rank": 4, "train.lr": 0.001})
    a128 = _run(root, "runs/exp-a__rank-128/bbbb", {"experiment": "exp-a__rank-128", "train.lora.rank": 128,
                                                    "train.lora.alpha": 128.0, "train.lr": 0.001})
    b = _run(root, "runs/exp-b/cccc", {"experiment": "exp-b", "prior.enabled": False})
    rows_a = [{"label": "base", "run_dir": None, "metrics": {"subject_fidelity": 0.0, "prompt_fidelity": 0.74}},
              {"label": "exp-a (this run)", "run_dir": a,
               "metrics": {"subject_fidelity": 0.671875, "prompt_fidelity": 0.765625, "pres": 0.0, "div": 0.33}},
              {"label": "rank-128", "run_dir": a128,
               "metrics": {"subject_fidelity": 0.0, "prompt_fidelity": 0.41, "pres": 0.0, "div": 0.12}}]
    rows_b = [{"label": "exp-b (this run)", "run_dir": b, "metrics": {"subject_fidelity": 0.875, "pres": 0.5}},
              {"label": "gone", "run_dir": "runs/exp-b__gone/dddd", "metrics": None}]
    notes_dir = root / "params" / "notes"
    notes_dir.mkdir(parents=True)
    (notes_dir / "parent.yaml").write_text("train: {steps: 600}\n", encoding="utf-8")
    (notes_dir / "a.yaml").write_text(yaml.safe_dump({"experiment": "exp-a", "notes": {
        "hypothesis": "The notes found rank 128 looks best. Rank 4 should do.",
        "conclusion": "Rank 4 reads {subject_fidelity@main} and {prompt_fidelity@main}. Rank 128 breaks: "
                      "{subject_fidelity@rank-128}, {prompt_fidelity@rank-128}; it differs from the notes."}}),
        encoding="utf-8")
    (notes_dir / "b.yaml").write_text(yaml.safe_dump({"experiment": "exp-b", "notes": {
        "hypothesis": "Prior off raises PRES.", "finding_in_notes": "Prior preservation prevents drift.",
        "verdict": "agrees",
        "conclusion": "PRES rises to {pres@prior-off}. Subject fidelity {subject_fidelity@main}."}}),
        encoding="utf-8")
    (notes_dir / "c.yaml").write_text(yaml.safe_dump({"notes": {"hypothesis": "Not run yet."}}), encoding="utf-8")
    _report(root, "exp-a", rows_a, {"hypothesis": "h", "conclusion": "recorded at run time"},
            params_file=str(notes_dir / "a.yaml"), rank_by="subject_fidelity")
    _report(root, "exp-b", rows_b, {"hypothesis": "h", "conclusion": ""}, params_file="params/notes/b.yaml")
    monkeypatch.chdir(tmp_path)  # relative run folders resolve against the project, not the cwd
    return root


def _table(page: str, marker: str) -> list[list[str]]:
    """Cell texts of the body rows of the table that follows `marker`."""
    part = page[page.index(marker):]
    body = part[part.index("<tbody>"):part.index("</tbody>")]
    rows = re.findall(r"<tr>(.*?)</tr>", body)
    return [[html.unescape(re.sub(r"<[^>]+>", " ", c)).split() for c in re.findall(r"<td[^>]*>(.*?)</td>", r)]
            for r in rows]


def test_all_runs_rows_list_the_params_that_differ_from_base_yaml(project: Path) -> None:
    page = runner.build_index(project / "reports").read_text(encoding="utf-8")

    rows = _table(page, 'id="all-runs-table"')
    assert [" ".join(r[0] + r[1]) for r in rows] == ["exp-a exp-a (this run)", "exp-a rank-128",
                                                      "exp-b exp-b (this run)", "exp-b gone"]
    assert [" ".join(r[2]) for r in rows] == [
        "train.lora.rank = 4 train.lr = 0.001",
        "train.lora.alpha = 128.0 train.lora.rank = 128 train.lr = 0.001",
        "prior.enabled = false",
        "run folder missing: runs/exp-b__gone/dddd"]
    assert [[" ".join(c) for c in r[3:]] for r in rows] == [
        ["0.672", "0.766", "0.000", "0.330"], ["0.000", "0.410", "0.000", "0.120"],
        ["0.875", "", "0.500", ""], ["", "", "", ""]]
    assert runner.external_refs(page) == [] and "<script>" in page and 'class="sortable"' in page

    found = index_tables.all_runs([("exp-a", "exp-a/x/index.html", json.loads(
        (project / "reports/exp-a/0123456789ab/summary.json").read_text()))], project)
    assert [r["params"] for r in found] == [{"train.lora.rank": 4, "train.lr": 0.001},
                                            {"train.lora.alpha": 128.0, "train.lora.rank": 128, "train.lr": 0.001}]


def test_conclusions_are_checked_as_the_params_file_says_now(project: Path) -> None:
    page = runner.build_index(project / "reports").read_text(encoding="utf-8")
    first = page[:page.index('id="all-runs"')]
    # exp-a's file now cites four cells of its table; exp-b cites a row its table lacks
    assert first.count('class="stale"') == 1 and "no measured conclusion yet" not in first
    assert "conclusion may be stale: {pres@prior-off}: no row &#x27;prior-off&#x27; in the table" in first


def test_the_research_notes_section(project: Path) -> None:
    page = runner.build_index(project / "reports").read_text(encoding="utf-8")
    rows = _table(page, 'id="notes"')
    text = [[" ".join(c) for c in r] for r in rows]
    assert text == [
        ["exp-a a.yaml", "The notes found rank 128 looks best. Rank 4 should do.",
         "The notes found rank 128 looks best.", "Rank 4 reads 0.67 and 0.77.", "differs"],
        ["exp-b b.yaml", "Prior off raises PRES.", "Prior preservation prevents drift.",
         "PRES rises to ⚠{pres@prior-off}. ⚠ conclusion may be stale: {pres@prior-off}: no row 'prior-off' in "
         "the table (rows: exp-b (this run), gone; 'main' is the experiment's own run)", "agrees"],
        ["c not run yet c.yaml", "Not run yet.", "Not run yet.", "not measured yet", "—"]]
    assert 'href="exp-a/0123456789ab/index.html"' in page


def test_the_sort_script_orders_rows_by_the_clicked_column() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    # a minimal DOM: one sortable table, cells with data-sort or text; click header 1 (numeric) twice, then 0
    shim = """
var cls = function (names) { return {contains: function (n) { return names.indexOf(n) >= 0; }}; };
var cell = function (v, num) { return {dataset: v === undefined ? {} : {sort: v}, textContent: "t" + v,
  classList: cls(num ? ["num"] : [])}; };
var mk = function (name, v) { return {name: name, cells: [{dataset: {}, textContent: name, classList: cls([])},
  cell(v, true)]}; };
var body = {rows: [mk("b", "0.5"), mk("a", ""), mk("c", "10"), mk("d", "2")],
  appendChild: function (tr) { this.rows.splice(this.rows.indexOf(tr), 1); this.rows.push(tr); }};
var ths = [0, 1].map(function () { return {dataset: {}, style: {}, addEventListener: function (e, f) {
  this.click = f; }}; });
var table = {tBodies: [body], querySelectorAll: function () { return ths; }};
var document = {querySelectorAll: function () { return [table]; }};
var order = function () { return body.rows.map(function (r) { return r.name; }).join(""); };
""" + index_tables.SORT_JS + """
var out = [];
ths[1].click(); out.push(order()); ths[1].click(); out.push(order()); ths[0].click(); out.push(order());
console.log(out.join(" "));
"""
    result = subprocess.run([node, "-e", shim], capture_output=True, text=True, timeout=30, check=True)
    # numbers compare as numbers (2 < 10), empty cells go last either way
    assert result.stdout.split() == ["bdca", "cdba", "abcd"]


def test_a_committed_report_keeps_its_params_when_the_run_folder_is_gone(project: Path) -> None:
    params = index_tables.base_params()
    params["train"]["lr"] = 0.004
    summary = {"rows": [{"label": "kept", "run_dir": "runs/nowhere/eeee", "metrics": {"subject_fidelity": 0.5},
                         "params": params}]}
    found = index_tables.all_runs([("exp-c", "exp-c/x/index.html", summary)], project)
    assert found[0]["params"] == {"train.lr": 0.004}
