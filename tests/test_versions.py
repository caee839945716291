"""Report versions: an edited experiment is a new version, never an overwrite of the old one.

The run hash leaves out ``ablation``, ``merge`` and ``report`` (a variant is trained under its
own hash), but those sections change what a report shows, so they name the report version
(config.version_hash). Held here through the path a user takes: the real notebooks, the queue
of `dbkit run params/notes/*.yaml`, a file edited in between.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dbkit import config, runner, runqueue

ROOT = Path(__file__).resolve().parent.parent


def _params(base: Path, vary: str, weights: str = "[]") -> str:
    return (f"extends: {ROOT / 'params' / 'base.yaml'}\n"
            "experiment: vtest\n"
            "notes: {hypothesis: 'versions', conclusion: 'none yet'}\n"
            f"base: {{model: {base}}}\n"
            "prior: {num_images: 2, steps: 2}\n"
            "train: {steps: 2, batch_size: 2, save_every: 2, sample_every: 2}\n"
            "sample: {steps: 2, seeds: [0]}\n"
            "metrics: {num_per_prompt: 1}\n"
            f"ablation: {{vary: {{train.lora.rank: {vary}}}}}\n"
            f"merge: {{weights: {weights}}}\n")


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_version_hash_covers_ablation_merge_report_but_not_workers(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(f"extends: {config.BASE_PATH}\nexperiment: x\n")
    exp = config.load(path)
    same_run = {"ablation.vary": {"train.lora.rank": [2]}, "merge.density": 0.3, "report.plateau_eps": 0.05}
    for key, value in same_run.items():
        other = config.load(path, [f"{key}={json.dumps(value)}"])
        assert other.hash == exp.hash, key  # the main run is the same training...
        assert other.version != exp.version, key  # ...but the report shows something else
    workers = config.load(path, ["ablation.workers=2"])
    assert workers.version == exp.version  # the same tables, computed side by side
    assert config.load(path, ["train.steps=7"]).version != exp.version


@pytest.mark.slow
def test_editing_vary_publishes_a_new_version_and_trains_only_the_new_variant(in_tmp, tiny_base) -> None:
    params = in_tmp / "params_v.yaml"
    params.write_text(_params(tiny_base, "[2]"))
    nbs = ROOT / "notebooks"
    first = runqueue.run_queue([str(params)], [], reports_root=Path("reports"), notebooks_dir=nbs, progress=False)
    assert [o.status for o in first] == ["ran"]
    old = Path(first[0].report)
    before = _files(old)
    variant_logs = {p: p.read_bytes() for p in Path("runs").glob("vtest__*/*/train_log.jsonl")}
    assert len(variant_logs) == 1  # rank 2

    params.write_text(_params(tiny_base, "[2, 4]"))  # a user adds one variant
    second = runqueue.run_queue([str(params)], [], reports_root=Path("reports"), notebooks_dir=nbs, progress=False)
    assert [o.status for o in second] == ["ran"]  # not skipped as "already published"
    new = Path(second[0].report)
    assert new != old and new.parent == old.parent
    assert _files(old) == before  # the earlier version, byte for byte
    for log, content in variant_logs.items():
        assert log.read_bytes() == content  # rank 2 was reused, not trained again
    logs = sorted(Path("runs").glob("vtest__*/*/train_log.jsonl"))
    assert len(logs) == 2  # only rank 4 trained
    rows = json.loads((new / "summary.json").read_text())["rows"]
    assert [r["label"] for r in rows][2:] == ["train.lora.rank=2", "train.lora.rank=4"]
    assert json.loads((new / "version.json").read_text())["version"] == config.load(params).version

    third = runqueue.run_queue([str(params)], [], reports_root=Path("reports"), notebooks_dir=nbs, progress=False)
    assert [o.status for o in third] == ["skipped"]
    versions = (old.parent / "index.html").read_text()
    assert old.name in versions and new.name in versions
    assert runner.VERSION_FILE in {p.name for p in old.iterdir()}


def test_a_report_refuses_the_table_another_version_left_in_the_shared_run_folder(tmp_path: Path) -> None:
    """Versions of one run hash share its run folder, and so its ablation.json: rendering
    05_report for version A after B's 04_ablations must not publish B's table as A's."""
    from dbkit import workflow

    path = tmp_path / "x.yaml"
    path.write_text(f"extends: {config.BASE_PATH}\nexperiment: x\nablation: {{vary: {{train.lora.rank: [2]}}}}\n")
    a = config.load(path)
    b = config.load(path, ["ablation.vary={train.lora.rank: [2, 4]}"])
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "ablation.json").write_text(json.dumps({"vary": {}, "rows": [], "grids": [], "version": b.version}))
    with pytest.raises(workflow.AblationMismatch, match=rf"another version .*{b.version[:12]}.*{a.version[:12]}.*"
                                                        r"--only 04_ablations 05_report"):
        workflow.summarise(a, rd)


def test_an_edited_merge_source_is_a_new_version(tmp_path: Path) -> None:
    """merge.loras names a params file: editing that file retrains the source under another run
    hash, so the merge of it is another table, though the merging experiment is unchanged."""
    src = tmp_path / "style.yaml"
    src.write_text(f"extends: {config.BASE_PATH}\nexperiment: s\n")
    path = tmp_path / "merge.yaml"
    path.write_text(f"extends: {config.BASE_PATH}\nexperiment: m\nmerge: {{loras: [this, {src}], methods: [cat]}}\n")
    before = config.load(path)
    first = before.version  # named before the edit
    src.write_text(f"extends: {config.BASE_PATH}\nexperiment: s\ntrain: {{steps: 7}}\n")
    after = config.load(path)
    assert after.hash == before.hash and after.version != first
