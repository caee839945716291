"""`dbkit compare A B` shows exactly what differs between two runs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from dbkit import cli, compare, config, runs


def make_run(folder: Path, params: dict, metrics: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_only_the_differing_keys_are_shown(tmp_path: Path, capsys) -> None:
    base = {"seed": 0, "train": {"lr": 0.002, "lora": {"rank": 8, "alpha": 8}, "steps": 600},
            "sample": {"seeds": [0, 1]}}
    other = json.loads(json.dumps(base))
    other["train"]["lora"] |= {"rank": 32, "alpha": 32}
    other["sample"]["seeds"] = [0, 1, 2]
    a = make_run(tmp_path / "a", base, {"subject_fidelity": 0.5, "prompt_fidelity": 0.8, "pres": 0.0})
    b = make_run(tmp_path / "b", other, {"subject_fidelity": 0.7, "prompt_fidelity": 0.8, "div": 0.4})
    diff = compare.differences(a, b)
    assert diff["params"] == {"sample.seeds": ([0, 1], [0, 1, 2]), "train.lora.alpha": (8, 32),
                              "train.lora.rank": (8, 32)}
    assert diff["metrics"] == {"div": (None, 0.4), "pres": (0.0, None), "subject_fidelity": (0.5, 0.7)}
    assert cli.main(["compare", str(a), str(b), "--html", str(tmp_path / "c.html")]) == 0
    out = capsys.readouterr().out
    assert "train.lora.rank" in out and "train.lr" not in out and "prompt_fidelity" not in out
    page = (tmp_path / "c.html").read_text()
    assert "train.lora.alpha" in page and "http" not in page.replace("<!doctype html>", "")
    assert compare.differences(a, a) == {"params": {}, "metrics": {}}


def test_a_params_file_names_its_run_folder(in_tmp: Path, capsys) -> None:
    (in_tmp / "x.yaml").write_text("extends: params/base.yaml\nexperiment: x\n")
    exp = config.load(in_tmp / "x.yaml", [])
    assert cli.main(["compare", str(in_tmp / "x.yaml"), str(in_tmp)]) == 2  # not run yet
    assert "does not exist yet: `dbkit run" in capsys.readouterr().err
    rd = runs.RUNS_ROOT / exp.name / exp.hash[:12]
    make_run(in_tmp / rd, {"seed": 0}, {})
    other = make_run(in_tmp / "elsewhere", {"seed": 1}, {})
    assert compare.run_folder(in_tmp / "x.yaml") == rd
    assert compare.differences(in_tmp / rd, other)["params"] == {"seed": (0, 1)}
    assert cli.main(["compare", str(in_tmp / "x.yaml"), "nope"]) == 2
    assert "nope: no such run folder or params file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- committed reports

ROOT = Path(__file__).resolve().parent.parent


def make_report(folder: Path, experiment: str, rows: list[dict], published: str = "2026-01-01T00:00:00+00:00",
                grids: list[str] = ()) -> Path:
    """A report version folder as `dbkit run` commits it: summary.json rows + version.json."""
    folder.mkdir(parents=True)
    summary = {"experiment": experiment, "rows": [{"label": "base", "run_dir": None, "metrics": {"div": 0.3}}, *rows],
               "grids": [{"prompt": "p", "file": g} for g in grids]}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "version.json").write_text(json.dumps({"experiment": experiment, "status": "ok", "published": published}))
    return folder


def printed_rows(out: str, section: str) -> dict:
    """The `key  a  →  b` lines printed under one section, parsed back to values."""
    import ast

    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{section}:"))
    rows = {}
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        key, rest = line.strip().split(None, 1)
        va, vb = rest.split("  →  ")
        rows[key] = (ast.literal_eval(va.strip()), ast.literal_eval(vb.strip()))
    return rows


PARAMS = {"seed": 0, "train": {"lr": 0.002, "steps": 600, "lora": {"rank": 8}}, "sample": {"seeds": [0, 1]}}


def test_report_rows_print_exactly_their_differences(tmp_path: Path, capsys) -> None:
    other = {"seed": 0, "train": {"lr": 0.001, "steps": 600, "lora": {"rank": 32}}, "sample": {"seeds": [0, 1]}}
    ra = make_report(tmp_path / "reports/exp-a/aaaaaaaaaaaa", "exp-a", [
        {"label": "exp-a (this run)", "run_dir": "runs/exp-a/aaaaaaaaaaaa", "params": {"experiment": "exp-a", **PARAMS},
         "metrics": {"subject_fidelity": 0.25, "div": 0.4}}], grids=["ablation/grid_p0.png"])
    (ra / "ablation").mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8), (255, 0, 0)).save(ra / "ablation/grid_p0.png")
    make_report(tmp_path / "reports/exp-b/bbbbbbbbbbbb", "exp-b", [
        {"label": "exp-b (this run)", "run_dir": "runs/exp-b/bbbbbbbbbbbb", "params": {"experiment": "exp-b", **PARAMS},
         "metrics": {"subject_fidelity": 0.9, "div": 0.4}},
        {"label": "train.lr=0.001", "run_dir": "runs/exp-b__lr-0.001/cccccccccccc",
         "params": {"experiment": "exp-b__lr-0.001", **other}, "metrics": {"subject_fidelity": 0.75, "div": 0.4}}],
        grids=["ablation/grid_p0.png"])  # named but not committed
    html_out = tmp_path / "c.html"
    assert cli.main(["compare", str(ra), f"{tmp_path}/reports/exp-b#lr-0.001", "--html", str(html_out)]) == 0
    out = capsys.readouterr().out
    assert printed_rows(out, "params") == {"train.lora.rank": (8, 32), "train.lr": (0.002, 0.001)}
    assert printed_rows(out, "metrics") == {"subject_fidelity": (0.25, 0.75)}
    assert "B: " + str(tmp_path / "reports/exp-b/bbbbbbbbbbbb#train.lr=0.001") in out
    assert "named/described differently (not params that train): experiment\n" in out
    page = html_out.read_text()
    assert page.count("<img ") == 1 and "B: no pictures committed" in page and "A: no pictures" not in page
    # the main row when no label is given, the full label too; the same row is the same
    assert cli.main(["compare", f"{tmp_path}/reports/exp-b", f"{tmp_path}/reports/exp-b/bbbbbbbbbbbb#exp-b (this run)"
                     ]) == 0
    out = capsys.readouterr().out
    assert "params: the same" in out and "metrics: the same" in out


def test_report_labels_versions_and_refusals(tmp_path: Path, capsys) -> None:
    row = {"label": "e (this run)", "run_dir": "runs/e/x", "params": {"experiment": "e", **PARAMS}, "metrics": {}}
    make_report(tmp_path / "e/111111111111", "e", [row], published="2026-05-01T00:00:00+00:00")
    make_report(tmp_path / "e/000000000000", "e", [{**row, "params": {"experiment": "e", "seed": 7}}],
                published="2026-06-01T00:00:00+00:00")  # newer although its name sorts first
    s = compare.side(f"{tmp_path}/e#e (this run)")
    assert s.params["seed"] == 7 and "000000000000" in s.name and "2 reports: using the newest, 000000000000" in s.note
    assert cli.main(["compare", f"{tmp_path}/e", f"{tmp_path}/e/111111111111"]) == 0
    assert "using the newest, 000000000000" in capsys.readouterr().out
    assert cli.main(["compare", f"{tmp_path}/e#nope", f"{tmp_path}/e"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/e/000000000000/summary.json: no row labelled 'nope'" in err
    assert "'base', 'e (this run)'" in err
    assert cli.main(["compare", f"{tmp_path}/e#base", f"{tmp_path}/e"]) == 2
    assert "row 'base' has no params" in capsys.readouterr().err


def test_a_run_folder_against_a_report_row(tmp_path: Path, capsys) -> None:
    a = make_run(tmp_path / "runs/e/aaaaaaaaaaaa", {"experiment": "e", **PARAMS, "seed": 3}, {"div": 0.1})
    make_report(tmp_path / "reports/e/bbbbbbbbbbbb", "e", [
        {"label": "e (this run)", "run_dir": "runs/e/bbbbbbbbbbbb", "params": {"experiment": "e", **PARAMS},
         "metrics": {"div": 0.2}}])
    assert cli.main(["compare", str(a), f"{tmp_path}/reports/e", "--html", str(tmp_path / "c.html")]) == 0
    out = capsys.readouterr().out
    assert printed_rows(out, "params") == {"seed": (3, 0)} and printed_rows(out, "metrics") == {"div": (0.1, 0.2)}
    assert "named/described" not in out and "B: no pictures committed" in (tmp_path / "c.html").read_text()


def flat(d: dict, prefix: str = "") -> dict:
    """Dotted leaves of nested dicts (lists are leaves), written here independently of dbkit."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_the_committed_ema_report(capsys) -> None:
    # the newest published version, which "reports/notes-ema" alone means
    versions = [json.loads(v.read_text()) | {"dir": v.parent}
                for v in (ROOT / "reports/notes-ema").glob("*/version.json")]
    report = max(versions, key=lambda v: v["published"])["dir"]
    rows = {r["label"]: r for r in json.loads((report / "summary.json").read_text())["rows"]}
    fa, fb = (flat({k: v for k, v in rows[label]["params"].items() if k not in ("experiment", "notes")})
              for label in ("notes-ema (this run)", "train.ema_decay=0.99"))
    expected = {k: (fa.get(k), fb.get(k)) for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}
    assert set(expected) == {"train.ema_decay"}
    assert cli.main(["compare", str(ROOT / "reports/notes-ema"), f"{report}#ema_decay-0.99"]) == 0
    assert printed_rows(capsys.readouterr().out, "params") == expected


def test_a_run_older_than_metrics_seed_compares_as_seed_100(tmp_path: Path) -> None:
    """Runs written before metrics.seed existed lack the key; they drew seeds 100…, so against a
    new run at 100 nothing differs, and against 200 exactly that key does."""
    old = {"seed": 0, "metrics": {"backend": "oracle", "num_per_prompt": 8}}
    a = make_run(tmp_path / "a", old, {"subject_fidelity": 0.5})
    b = make_run(tmp_path / "b", {**old, "metrics": {**old["metrics"], "seed": 100}}, {"subject_fidelity": 0.5})
    c = make_run(tmp_path / "c", {**old, "metrics": {**old["metrics"], "seed": 200}}, {"subject_fidelity": 0.5})
    assert compare.differences(a, b) == {"params": {}, "metrics": {}}
    assert compare.differences(a, c)["params"] == {"metrics.seed": (100, 200)}
