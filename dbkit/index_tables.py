"""The cross-experiment sections of ``reports/index.html`` below the ranking
(:func:`dbkit.runner.build_index` calls these; each returns HTML, self-contained):

- :func:`all_runs_html`: one row per trained model of every experiment (the main run and each
  ablation variant, from the latest report's ``summary.json`` rows), the params where it differs
  from ``params/base.yaml`` (read from the run folder's ``params.yaml``) and its key metrics;
  a click on a column header sorts the table (a few lines of inline JavaScript, no library).
- :func:`notes_html`: every research-notes experiment (``params/notes/*.yaml``) with its
  hypothesis, the first sentence of its measured conclusion (or "not measured yet"), what the
  notes found (``notes.finding_in_notes``, else the hypothesis' first sentence) and whether
  the measurement agrees (``notes.verdict``, else read from the conclusion).
- :func:`conclusion_check`: a summary's conclusion checked against its table, re-read from
  the params file when it is there (a conclusion edited after the run is checked as it now reads).

Everything is recomputed from files at every build, so the index says what is true now.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import conclusions, config, metric_registry

KEY_METRICS = metric_registry.KEY_METRICS
_SKIP_PREFIXES = ("notes", "experiment", "ablation", "report")  # a run's name and prose, not what it computes

SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.title = "click to sort"; th.style.cursor = "pointer";
    th.addEventListener("click", function () {
      var asc = th.dataset.dir !== "asc"; th.dataset.dir = asc ? "asc" : "desc";
      var body = table.tBodies[0];
      var key = function (tr) {  // null for an empty cell; numbers for class "num", else text
        var c = tr.cells[col];
        var v = !c ? "" : (c.dataset.sort !== undefined ? c.dataset.sort : c.textContent.trim());
        return v === "" ? null : (c.classList.contains("num") ? parseFloat(v) : v.toLowerCase());
      };
      Array.prototype.slice.call(body.rows).sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }  // empty cells last
        var c = x < y ? -1 : x > y ? 1 : 0;
        return asc ? c : -c;
      }).forEach(function (tr) { body.appendChild(tr); });
    });
  });
});
"""

INDEX_CSS = """
h2 { font-size: 1.25em; margin-top: 2em; }
div.stale { color: #9a6700; background: #fff8c5; border-left: 3px solid #d4a72c; padding: 2px 6px; margin-top: 4px; }
td.params code { display: block; white-space: nowrap; }
"""


def project_root(reports_root: Path) -> Path:
    """The folder holding reports/ (and runs/, params/): relative run folders are resolved there."""
    return Path(reports_root).resolve().parent


def _resolve(path: str | Path, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else root / p


def base_params() -> dict:
    """``params/base.yaml``'s defaults, the reference the all-runs table diffs against."""
    return yaml.safe_load(config.BASE_PATH.read_text(encoding="utf-8")) or {}


def params_vs_base(params: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted key → this run's value, for every param that differs from base.yaml (names and prose left out)."""
    return {k: pair[1] for k, pair in config.diff(dict(base), dict(params)).items()
            if not k.startswith(_SKIP_PREFIXES)}


def all_runs(experiments: Sequence[tuple[str, str, Mapping[str, Any]]], root: Path) -> list[dict]:
    """Rows of the all-runs table from (experiment, report href, summary) triples, by experiment
    name: one per trained row of the summary (the base model's row is the same in every experiment and is left out).
    Each row: experiment, variant, href, run_dir, params (key → value, differing from base.yaml;
    None when the run folder is gone) and the key metrics."""
    base = base_params()
    out = []
    for name, href, summary in sorted(experiments, key=lambda e: e[0]):
        for row in summary.get("rows") or []:
            if not isinstance(row, Mapping) or not row.get("run_dir"):
                continue
            params = read_yaml(_resolve(row["run_dir"], root) / "params.yaml")
            if params is None and isinstance(row.get("params"), Mapping):
                params = row["params"]  # the report keeps them when the run folder is gone
            metrics = row.get("metrics") if isinstance(row.get("metrics"), Mapping) else {}
            out.append({"experiment": name, "variant": str(row.get("label", "")), "href": href,
                        "run_dir": str(row["run_dir"]),
                        "params": params_vs_base(params, base) if params is not None else None,
                        **{k: metrics.get(k) for k in KEY_METRICS}})
    return out


def read_yaml(path: Path) -> dict | None:
    """A YAML mapping from a file; None when it is missing or unreadable."""
    try:
        obj = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return obj if isinstance(obj, dict) else None


def _num(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f'<td class="num" data-sort="{v!r}">{v:.3f}</td>'
    return '<td class="num" data-sort=""></td>'


def _yaml_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, allow_unicode=True).strip().removesuffix("...").strip()


def all_runs_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """The sortable all-runs table (see :func:`all_runs`)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("experiment", "variant", "params ≠ base.yaml",
                                                          *KEY_METRICS))
    body = []
    for r in rows:
        if r["params"] is None:
            params = f"<em>run folder missing: {html.escape(r['run_dir'])}</em>"
            sort = ""
        else:
            params = "".join(f"<code>{html.escape(k)} = {html.escape(_yaml_value(v))}</code>"
                             for k, v in r["params"].items()) or "<em>none</em>"
            sort = " ".join(f"{k}={_yaml_value(v)}" for k, v in r["params"].items())
        body.append(f'<tr><td><a href="{html.escape(r["href"])}">{html.escape(r["experiment"])}</a></td>'
                    f"<td>{html.escape(r['variant'])}</td>"
                    f'<td class="params" data-sort="{html.escape(sort)}">{params}</td>'
                    + "".join(_num(r.get(k)) for k in KEY_METRICS) + "</tr>")
    if not body:
        body.append(f'<tr><td colspan="{3 + len(KEY_METRICS)}">No trained run in any report yet.</td></tr>')
    return (f'<h2 id="all-runs">All runs</h2><p class="sub">{len(rows)} trained model(s): every experiment\'s '
            "run and ablation variants; click a column header to sort</p>"
            f'<table class="sortable" id="all-runs-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


# ----------------------------------------------------------------------------- conclusions


def notes_of(summary: Mapping[str, Any], root: Path) -> dict:
    """The experiment's notes as its params file says now (notes are outside the params hash:
    they may have been edited since the run), else as the summary recorded them."""
    recorded = summary.get("notes") if isinstance(summary.get("notes"), Mapping) else {}
    params_file = summary.get("params_file")
    raw = read_yaml(_resolve(params_file, root)) if params_file else None
    notes = raw.get("notes") if raw else None
    return dict(notes) if isinstance(notes, Mapping) else dict(recorded)


def conclusion_check(summary: Mapping[str, Any], root: Path) -> dict:
    """:func:`dbkit.conclusions.check` of the experiment's current conclusion against its summary's rows."""
    ignore = conclusions.params_figures(summary.get("vary") or {}, summary.get("variants") or {},
                                        summary.get("diff") or {})
    return conclusions.check(notes_of(summary, root).get("conclusion", ""), summary.get("rows") or [], ignore)


def stale_html(check: Mapping[str, Any]) -> str:
    """The banner of a flagged conclusion ('' when there is nothing to flag)."""
    return f'<div class="stale">⚠ {html.escape(check["message"])}</div>' if check.get("message") else ""


# ----------------------------------------------------------------------------- research notes


def notes_experiments(notes_dir: Path, summaries: Mapping[str, tuple[str, Mapping[str, Any]]],
                      root: Path) -> list[dict]:
    """One entry per ``notes_dir/*.yaml`` that states a hypothesis (the common parent does not):
    file, experiment, hypothesis, finding (the notes'), answer (first sentence of the measured
    conclusion, or "not measured yet"), verdict, href ('' when not reported), check (the
    conclusion against the run's table; None when not reported). ``summaries``: experiment name →
    (report href, summary)."""
    out = []
    for path in sorted(Path(notes_dir).glob("*.yaml")):
        raw = read_yaml(path) or {}
        notes = raw.get("notes") if isinstance(raw.get("notes"), Mapping) else {}
        hypothesis = " ".join(str(notes.get("hypothesis") or "").split())
        if not hypothesis:
            continue
        name = str(raw.get("experiment") or path.stem)
        href, summary = summaries.get(name, ("", None))
        conclusion = str(notes.get("conclusion") or "").strip()
        out.append({
            "file": path.name, "experiment": name, "hypothesis": hypothesis,
            "finding": " ".join(str(notes.get("finding_in_notes") or "").split())
            or conclusions.first_sentence(hypothesis),
            "answer": (conclusions.first_sentence(conclusions.render(conclusion, (summary or {}).get("rows") or []))
                       if conclusion else "not measured yet"),
            "verdict": conclusions.verdict(notes) if conclusion else "",
            "href": href,
            "check": conclusion_check(summary, root) if summary is not None else None,
        })
    return out


def notes_html(entries: Sequence[Mapping[str, Any]]) -> str:
    """The research-notes table (see :func:`notes_experiments`)."""
    body = []
    for e in entries:
        name = html.escape(e["experiment"])
        link = f'<a href="{html.escape(e["href"])}">{name}</a>' if e["href"] else f"{name}<br><em>not run yet</em>"
        answer = html.escape(e["answer"]) + (stale_html(e["check"]) if e["check"] else "")
        body.append(f"<tr><td>{link}<br><code>{html.escape(e['file'])}</code></td>"
                    f"<td>{html.escape(e['hypothesis'])}</td><td>{html.escape(e['finding'])}</td>"
                    f"<td>{answer}</td><td>{html.escape(e['verdict'] or '—')}</td></tr>")
    if not body:
        return ""
    return ('<h2 id="notes">The research notes, reproduced</h2><p class="sub">every experiment in params/notes/: '
            "what the notes found and what this project measured</p>"
            '<table class="sortable"><thead><tr><th>experiment</th><th>hypothesis</th><th>the notes found</th>'
            f"<th>measured answer</th><th>agrees?</th></tr></thead><tbody>{''.join(body)}</tbody></table>")
