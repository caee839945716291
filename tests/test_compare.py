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
