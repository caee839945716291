"""The five notebooks: committed without outputs, and executed end to end by papermill."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dbkit import runner

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_five_notebooks_committed_without_outputs_and_with_parameters():
    assert [p.stem for p in NOTEBOOKS] == list(runner.NOTEBOOKS)
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), path.name
        assert any("parameters" in c["metadata"].get("tags", []) for c in code), path.name
        # thin: no function or class definitions in notebooks, all logic lives in dbkit
        assert not any(re.search(r"^\s*(def|class) ", "".join(c["source"]), re.M) for c in code), path.name


@pytest.mark.slow
def test_all_five_notebooks_run_through_papermill(in_tmp, tiny_base):
    params = in_tmp / "nbtest.yaml"
    params.write_text(
        f"extends: {ROOT / 'params' / 'base.yaml'}\n"
        "experiment: nbtest\n"
        "notes: {hypothesis: 'the **pipeline** runs', conclusion: 'it does'}\n"
        f"base: {{model: {tiny_base}}}\n"
        "prior: {num_images: 2, steps: 2}\n"
        "train: {steps: 4, batch_size: 2, save_every: 2, sample_every: 2}\n"
        "sample: {steps: 2, seeds: [0, 1]}\n"
        "metrics: {num_per_prompt: 2}\n"
        "ablation: {vary: {train.lora.rank: [2]}}\n"
    )
    out = runner.run_experiment(params, [], reports_root=in_tmp / "reports", notebooks_dir=ROOT / "notebooks")
    index = (out / "index.html").read_text()
    for nb in runner.NOTEBOOKS:
        assert (out / f"{nb}.html").exists()
    assert index.count("data:image/png;base64") >= 3  # grids and curves are embedded
    assert "the <strong>pipeline</strong> runs" in index  # notes rendered as Markdown
    assert "rank" in index and "subject_fidelity" in index
    assert runner.external_refs(index) == []
    assert "workflow.summarise" not in index  # rendered without code cells
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "nbtest" and "subject_fidelity" in summary["metrics"]
    assert summary["conclusion_check"]["status"] == "unchecked"  # "it does" quotes no figure: nothing to flag
    # each notebook recorded its own stage; training's record is the one the report shows
    stages = summary["provenance"]["stages"]
    assert set(stages) == {"data", "captions", "train", "metrics", "ablations", "report"}
    assert stages["train"]["timestamp"] <= stages["report"]["timestamp"] and stages["train"]["finished"]
    assert summary["data_fingerprint"] == stages["train"]["data_fingerprint"]
    assert f"<code>{summary['data_fingerprint']}</code>" in index and "training started" in index
    assert "nbtest" in (in_tmp / "reports" / "index.html").read_text()
    # the same run folder is reused: a second run does not retrain
    runs = list((in_tmp / "runs" / "nbtest").iterdir())
    assert len(runs) == 1 and (runs[0] / "train_done.json").exists()
    # re-running only the report restamps the report, never training or the other stages
    runner.run_experiment(params, [], reports_root=in_tmp / "reports", notebooks_dir=ROOT / "notebooks",
                          only=["05_report"])
    again = json.loads((runs[0] / "provenance.json").read_text())["stages"]
    assert {k: v for k, v in again.items() if k != "report"} == {k: v for k, v in stages.items() if k != "report"}
