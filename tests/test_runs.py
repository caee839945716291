"""Tests of dbkit.runs: atomic writes, run folders, provenance, timings and cache paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from dbkit import config, files, runs


def exp_with(tmp_path: Path, **sections: object) -> config.Experiment:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"extends": str(config.BASE_PATH), **sections}))
    return config.load(path)


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "f.txt"
    files.atomic_write_text(target, "one")
    files.atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert os.listdir(target.parent) == ["f.txt"]
    assert target.stat().st_mode & 0o777 == 0o644
    files.atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    files.atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        files.atomic_write_json(target, {"a": object()})
    assert files.read_json(target) == {"a": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def test_read_json_default_and_paths(tmp_path: Path) -> None:
    assert files.read_json(tmp_path / "missing.json", default={"x": 0}) == {"x": 0}
    files.atomic_write_json(tmp_path / "p.json", {"where": Path("a/b")})
    assert files.read_json(tmp_path / "p.json") == {"where": "a/b"}


def test_run_dir_reused_for_same_params_and_new_for_changed(tmp_path: Path) -> None:
    exp = exp_with(tmp_path, train={"steps": 7})
    first = runs.run_dir(exp, root=tmp_path / "runs")
    assert first == tmp_path / "runs" / "exp" / exp.hash[:12]
    assert (first / "hash.txt").read_text().strip() == exp.hash
    assert yaml.safe_load((first / "params.yaml").read_text()) == exp.params
    (first / "checkpoint.bin").write_bytes(b"resume me")

    # same params, notes edited: same folder, work kept, params.yaml updated
    again = exp_with(tmp_path, train={"steps": 7}, notes={"hypothesis": "later thoughts"})
    assert runs.run_dir(again, root=tmp_path / "runs") == first
    assert (first / "checkpoint.bin").read_bytes() == b"resume me"
    assert "later thoughts" in (first / "params.yaml").read_text()

    changed = exp_with(tmp_path, train={"steps": 8})
    other = runs.run_dir(changed, root=tmp_path / "runs")
    assert other != first and other.parent == first.parent
    assert (other / "hash.txt").read_text().strip() == changed.hash
    assert yaml.safe_load((first / "params.yaml").read_text())["train"]["steps"] == 7


def test_run_dir_refuses_a_folder_with_another_hash(tmp_path: Path) -> None:
    exp = exp_with(tmp_path)
    folder = runs.run_dir(exp, root=tmp_path)
    (folder / "hash.txt").write_text("0" * 64 + "\n")
    with pytest.raises(runs.RunDirError, match=r"holds a run with params hash 0{64}"):
        runs.run_dir(exp, root=tmp_path)


def test_latest_run(tmp_path: Path) -> None:
    assert runs.latest_run("exp", root=tmp_path) is None
    a = runs.run_dir(exp_with(tmp_path, seed=1), root=tmp_path)
    b = runs.run_dir(exp_with(tmp_path, seed=2), root=tmp_path)
    os.utime(a, ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    os.utime(b, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    (tmp_path / "exp" / "not-a-run").mkdir()
    assert runs.latest_run("exp", root=tmp_path) == a


def test_provenance_keys(tmp_path: Path) -> None:
    exp = exp_with(tmp_path, seed=42)
    folder = runs.run_dir(exp, root=tmp_path)
    info = runs.write_provenance(folder, exp, "data")
    assert files.read_json(folder / "provenance.json") == {"stages": {"data": info}}
    assert {"git_commit", "git_dirty", "python", "platform", "packages", "device", "params_hash", "seed",
            "timestamp", "data_fingerprint"} <= info.keys()
    assert info["data_fingerprint"] and len(info["data_fingerprint"]) == 16
    assert info["params_hash"] == exp.hash and info["seed"] == 42
    assert set(info["packages"]) == {"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors",
                                     "papermill", "numpy"}
    assert info["packages"]["numpy"]  # installed in this venv
    assert info["timestamp"].endswith("+00:00")
    assert info["device"]
    assert info["git_commit"] is None or len(info["git_commit"]) == 40


def test_each_stage_keeps_its_own_provenance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp = exp_with(tmp_path)
    folder = runs.run_dir(exp, root=tmp_path)
    monkeypatch.setattr(runs, "_git", lambda *a: "a" * 40 if a[0] == "rev-parse" else "")
    monkeypatch.setattr(runs, "utc_now", lambda: "2024-01-01T00:00:00+00:00")
    runs.write_provenance(folder, exp, "data")
    runs.write_provenance(folder, exp, "train", resumed_from=None)
    runs.update_provenance(folder, "train", finished="2024-01-01T01:00:00+00:00")
    monkeypatch.setattr(runs, "_git", lambda *a: "b" * 40 if a[0] == "rev-parse" else " M x.py\n")
    monkeypatch.setattr(runs, "utc_now", lambda: "2024-02-02T00:00:00+00:00")
    runs.write_provenance(folder, exp, "report")  # re-running only the report, a month later
    stages = files.read_json(folder / "provenance.json")["stages"]
    assert list(stages) == ["data", "train", "report"]
    assert stages["train"]["git_commit"] == "a" * 40 and stages["train"]["git_dirty"] is False
    assert stages["train"]["timestamp"] == "2024-01-01T00:00:00+00:00"
    assert stages["train"]["finished"] == "2024-01-01T01:00:00+00:00"
    assert stages["report"]["git_commit"] == "b" * 40 and stages["report"]["git_dirty"] is True
    # an older dbkit's single record is read as one record of unknown stage
    files.atomic_write_json(folder / "provenance.json", {"git_commit": "c" * 40})
    assert runs.read_provenance(folder) == {"stages": {"unknown": {"git_commit": "c" * 40}}}
    assert runs.read_provenance(tmp_path / "nowhere") == {"stages": {}}


def test_record_timing_merges(tmp_path: Path) -> None:
    runs.record_timing(tmp_path, "train", 12.34567)
    runs.record_timing(tmp_path, "sample", 1.5)
    runs.record_timing(tmp_path, "train", 13.0)
    assert files.read_json(tmp_path / "timings.json") == {"train": 13.0, "sample": 1.5}


def test_cache_path_stable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = runs.cache_path("class_images", {"prompt": "a star", "seed": 1, "n": 4}, root=tmp_path)
    b = runs.cache_path("class_images", {"n": 4, "seed": 1, "prompt": "a star"}, root=tmp_path)
    c = runs.cache_path("class_images", {"prompt": "a star", "seed": 2, "n": 4}, root=tmp_path)
    assert a == b != c
    assert a.parent == tmp_path / "class_images" and len(a.name) == 16
    assert a.name == config.stable_hash({"prompt": "a star", "seed": 1, "n": 4})[:16]
    monkeypatch.setenv("DBKIT_CACHE", str(tmp_path / "env"))
    assert runs.cache_path("latents", {"k": 1}).parent == tmp_path / "env" / "latents"
    monkeypatch.delenv("DBKIT_CACHE")
    assert runs.cache_path("latents", {"k": 1}).parent == Path(".cache/dbkit/latents")
    with pytest.raises(ValueError, match="simple folder name"):
        runs.cache_path("../up", {}, root=tmp_path)


def test_training_provenance_is_written_when_training_runs_not_when_a_run_is_reused(
        in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from dbkit import data, train, workflow

    exp, rd = workflow.open_experiment("params/base.yaml", ["experiment=prov"], stage="data")
    (rd / "captions.jsonl").write_text("")
    files.atomic_write_json(rd / "data.json", {"class_dir": None})
    sessions = []

    def fake_train(p, run_dir, records, **kw):  # stands in for the trainer: what it saw, then its output
        sessions.append(runs.read_provenance(run_dir)["stages"]["train"])
        (run_dir / "output").mkdir(exist_ok=True)
        return run_dir / "output"

    monkeypatch.setattr(train, "train", fake_train)
    workflow.run_training(exp, rd, progress=False)
    first = runs.read_provenance(rd)["stages"]["train"]
    assert first["params_hash"] == exp.hash and first["resumed_from"] is None and first["finished"]
    assert sessions == [{k: v for k, v in first.items() if k != "finished"}]  # recorded before training
    workflow.run_training(exp, rd, progress=False)  # finished: reused, neither retrained nor restamped
    _, rd2 = workflow.open_experiment("params/base.yaml", ["experiment=prov"], stage="report")
    assert rd2 == rd and len(sessions) == 1
    stages = runs.read_provenance(rd)["stages"]
    assert stages["train"] == first and list(stages) == ["data", "train", "report"]

    # an interrupted run resumed from a checkpoint: both sessions are on record
    (rd / "train_done.json").unlink()
    (rd / "checkpoints" / "checkpoint-000002").mkdir(parents=True)
    torch.save({"step": 2}, rd / "checkpoints" / "checkpoint-000002" / "state.pt")  # one a resume can load
    workflow.run_training(exp, rd, progress=False)
    resumed = runs.read_provenance(rd)["stages"]["train"]
    assert resumed["resumed_from"] == "checkpoint-000002"
    assert resumed["earlier"] == [{k: v for k, v in first.items() if k != "earlier"}]

    summary = workflow.summarise(exp, rd)
    assert summary["data_fingerprint"] == data.data_fingerprint(exp.params) == resumed["data_fingerprint"]
    assert summary["provenance"]["stages"]["train"] == resumed


def test_progress_names_the_checkpoint_a_resume_will_use(tmp_path: Path) -> None:
    """A state.pt cut short (no zip central directory) is passed over by the resume, so the
    progress message and provenance must not name it either."""
    import torch

    for step in (2, 4):
        ck = tmp_path / "checkpoints" / f"checkpoint-{step:06d}"
        ck.mkdir(parents=True)
        torch.save({"step": step, "w": torch.zeros(64)}, ck / "state.pt")
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4, 5)))
    assert runs.training_progress(tmp_path) == (5, 4)
    newest = tmp_path / "checkpoints" / "checkpoint-000004" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut short
    assert runs.training_progress(tmp_path) == (5, 2)
    assert [p.name for p in files.intact_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-000002"]
