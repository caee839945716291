"""Ablation variants side by side (ablation.workers) against the same variants trained one after
another in this process: the same LoRA tensors and metrics to the last digit, each worker at
the run's thread count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dbkit import config, cpu_threads, export, parallel, runs, workflow

ROOT = Path(__file__).resolve().parent.parent
TINY = ["threads=1", "train.steps=3", "train.sample_every=0", "train.save_every=0", "metrics.num_per_prompt=1",
        "sample.steps=2", "sample.seeds=[0]", "prior.enabled=false", "train.batch_size=1",
        "ablation.vary={train.lora.rank: [4]}", "ablation.variants={hot: {train.lr: 0.004}}"]


def _project(folder: Path, monkeypatch) -> None:
    folder.mkdir()
    (folder / "params").symlink_to(ROOT / "params")
    monkeypatch.chdir(folder)
    monkeypatch.setenv("DBKIT_CACHE", str(folder / ".cache"))  # nothing shared between the two


def _trained(workers: int) -> list[tuple[Path, dict | None]]:
    exp = config.load("params/notes/parent.yaml", [*TINY, f"ablation.workers={workers}"])
    return workflow.train_variants(workflow.variants(exp), exp.params["ablation"]["workers"], progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="thread counts are a CPU matter")
def test_two_workers_train_what_one_process_trains(tmp_path, monkeypatch):
    _project(tmp_path / "serial", monkeypatch)
    serial = _trained(1)
    assert torch.get_num_threads() == cpu_threads.default()  # the variants' one thread did not stay

    calls = []
    real = parallel.map_in_workers
    monkeypatch.setattr(parallel, "map_in_workers",
                        lambda fn, items, n, **kw: calls.append(n) or real(fn, items, n, **kw))

    def not_here(*args, **kwargs):
        raise AssertionError("a variant trained in the test's own process")

    monkeypatch.setattr(workflow, "_train_variant", not_here)  # spawned workers import the real one
    _project(tmp_path / "side_by_side", monkeypatch)
    side = _trained(2)
    assert calls == [2]

    assert [rd.name for rd, _ in side] == [rd.name for rd, _ in serial]  # same variants, same order
    for (a, ma), (b, mb) in zip(serial, side):
        assert ma == mb and ma  # every metric, exactly
        wa, wb = (load_file(rd / "output" / export.LORA_FILE) for rd in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        assert runs.read_provenance(b)["stages"]["train"]["device"] == "cpu (1 threads)"
    ranks = [load_file(rd / "output" / export.LORA_FILE) for rd, _ in side]
    assert {v.shape[0] for k, v in ranks[0].items() if "lora_A" in k} == {4}  # the rank-4 variant is rank 4


def test_workers_that_would_each_use_every_core_are_refused_when_the_run_opens(in_tmp):
    if torch.cuda.is_available() or cpu_threads.default() * 2 <= cpu_threads.cores():
        pytest.skip("the refusal is for CPUs whose threads two trainings would oversubscribe")
    refused = (r"ablation.workers 2: 2 trainings side by side on \d+ CPU cores, "
               r".*: parent__rank-4 \(\d+\), parent__hot .*; set threads: \d")
    args = [*TINY[1:], "ablation.workers=2"]  # threads: 0
    with pytest.raises(config.ConfigError, match=refused):
        workflow.open_experiment("params/notes/parent.yaml", args, stage="data")  # 01_data's first call
    exp = config.load("params/notes/parent.yaml", args)
    with pytest.raises(config.ConfigError, match=refused):
        workflow.train_variants(workflow.variants(exp), 2, progress=False)
    assert not (in_tmp / "runs" / exp.name).exists()  # refused before anything was made
    workflow.open_experiment("params/notes/parent.yaml", args, stage="report")  # a finished run's report renders


def test_variants_naming_one_folder_are_trained_once(in_tmp, monkeypatch):
    """A vary value and a named variant with the same overrides land in the same folder: one
    after another the second finds the first finished; side by side it would find it locked."""
    exp = config.load("params/notes/parent.yaml", [*TINY[:1], "ablation.vary={train.lr: [0.004]}",
                                                   "ablation.variants={lr-0.004: {train.lr: 0.004}}"])
    named = workflow.variants(exp)
    assert runs.run_dir(named[0][1]) == runs.run_dir(named[1][1])
    given = []
    monkeypatch.setattr(parallel, "map_in_workers",
                        lambda fn, items, n, **kw: given.extend(items) or [(runs.run_dir(x), {"m": 1}) for x in items])
    out = workflow.train_variants(named, 2, progress=False)
    assert len(given) == 1 and out == [out[0], out[0]]


def test_each_worker_gets_its_own_gpu_from_the_users_list():
    assert parallel.device_ids(3, None, 0) == [None, None, None]
    assert parallel.device_ids(3, None, 2) == ["0", "1", "0"]
    assert parallel.device_ids(2, "5, 7", 2) == ["5", "7"]  # CUDA_VISIBLE_DEVICES as the user set it


def test_a_variants_thread_count_is_put_back():
    before = torch.get_num_threads()
    with cpu_threads.applied({"threads": 1}):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    cpu_threads.apply({"threads": 0})
    assert torch.get_num_threads() == cpu_threads.default() == before


def test_the_default_is_remembered_before_a_run_first_sets_a_count(monkeypatch):
    """A notebook's kernel applies its run's `threads: 1` first thing; torch's own count must
    still be known afterwards (a later run at threads 0; the workers' check)."""
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "_default", None)  # a fresh process
    try:
        cpu_threads.apply({"threads": 1})
        assert cpu_threads.default() == before
    finally:
        torch.set_num_threads(before)

