"""A finished training reused by another experiment with the same params hash (dbkit.reuse):
not retrained, the same bytes, provenance naming the source; anything else trains."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from dbkit import cpu_threads, files, report, runs, train, workflow

ROOT = Path(__file__).resolve().parent.parent
TINY = ("train: {steps: 2, batch_size: 2, save_every: 1, sample_every: 2, lr: 0.01, text_encoder_lr: 0.01}\n"
        "prior: {enabled: false}\nsample: {steps: 2, seeds: [0]}\nmetrics: {num_per_prompt: 1}\n")
LORA = "output/pytorch_lora_weights.safetensors"


def no_training(*args, **kwargs):
    raise AssertionError("trained although a finished identical run exists")


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path → bytes)."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_identical_params_under_another_name_copy_the_trained_run(in_tmp: Path, tiny_base: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    params = in_tmp / "exp.yaml"
    params.write_text(f"extends: {ROOT / 'params' / 'base.yaml'}\nbase: {{model: {tiny_base}}}\n" + TINY)
    made = []
    for name in ("first", "second"):
        exp, rd = workflow.open_experiment(str(params), [f"experiment={name}"], stage="data")
        workflow.prepare_data(exp, rd)
        workflow.prepare_captions(exp, rd)
        made.append((exp, rd))
    (a, rd_a), (b, rd_b) = made
    assert a.hash == b.hash and rd_a != rd_b and rd_a.name == rd_b.name
    workflow.run_training(a, rd_a, progress=False)  # a real 2-step training
    workflow.evaluate_run(a, rd_a)
    trained = runs.read_provenance(rd_a)["stages"]["train"]

    monkeypatch.setattr(train, "train", no_training)
    assert workflow.run_training(b, rd_b, progress=False) == rd_b / "output"
    assert (rd_b / LORA).read_bytes() == (rd_a / LORA).read_bytes()
    for name in ("output", "checkpoints", "samples"):  # everything training left, file by file
        assert tree(rd_b / name) == tree(rd_a / name) != {}
    for name in ("train_log.jsonl", "steps_curve.jsonl"):
        assert (rd_b / name).read_bytes() == (rd_a / name).read_bytes()
    # the logs are copied, not linked: a resumed run appends to its own only
    assert not os.path.samefile(rd_b / "train_log.jsonl", rd_a / "train_log.jsonl")

    record = runs.read_provenance(rd_b)["stages"]["train"]
    assert record["reused_from"] == record["trained_in"] == str(rd_a)
    # the code, machine and times that trained the model are the source's; nothing says "trained here"
    assert {k: record[k] for k in trained} == trained and record["experiment"] == "first"
    shown = report.provenance_markdown({"provenance": runs.read_provenance(rd_b)})
    assert f"| training reused from | `{rd_a}` |" in shown
    assert files.read_json(rd_b / "train_done.json")["hash"] == b.hash
    assert "train (reused)" in files.read_json(rd_b / "timings.json")

    # the copied metrics are the reused model's: evaluating its output here gives the same numbers
    copied = files.read_json(rd_b / "metrics.json")
    assert copied == files.read_json(rd_a / "metrics.json")
    assert workflow.evaluate_run(b, rd_b) == copied


@pytest.fixture()
def fake_trainer(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """train.train replaced by one that writes a LoRA file naming the folder it trained in;
    returns the list of folders trained."""
    trained: list[str] = []

    def fake_train(p, run_dir, records, **kw):
        trained.append(str(run_dir))
        files.atomic_write_text(run_dir / LORA, f"trained in {run_dir}")
        return run_dir / "output"

    monkeypatch.setattr(train, "train", fake_train)
    return trained


def run(name: str, *overrides: str):
    exp, rd = workflow.open_experiment("params/base.yaml", [f"experiment={name}", *overrides], stage="data")
    (rd / "captions.jsonl").write_text("")
    files.atomic_write_json(rd / "data.json", {"class_dir": None})
    workflow.run_training(exp, rd, progress=False)
    return exp, rd


def test_only_identical_finished_free_runs_are_reused(fake_trainer: list[str]) -> None:
    a, rd_a = run("a")
    b, rd_b = run("b")
    assert fake_trainer == [str(rd_a)]  # b was not trained …
    assert (rd_b / LORA).read_text() == f"trained in {rd_a}"  # … it has a's model
    assert runs.read_provenance(rd_b)["stages"]["train"]["reused_from"] == str(rd_a)

    c, rd_c = run("c", "train.lr=0.001")  # other params: another model
    assert c.hash != a.hash and fake_trainer[-1] == str(rd_c)
    d, rd_d = run("d", "train.reuse_identical=false")  # the switch: same hash, trained anyway
    assert d.hash == a.hash and fake_trainer[-1] == str(rd_d)
    assert "reused_from" not in runs.read_provenance(rd_d)["stages"]["train"]

    _, rd_x = run("x", "train.lr=0.003")
    (rd_x / "train_done.json").unlink()  # an unfinished run (killed, say) is no source
    _, rd_y = run("y", "train.lr=0.003")
    assert fake_trainer[-1] == str(rd_y)

    _, rd_z = run("z", "train.lr=0.004")
    fd = os.open(rd_z / runs.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a trainer working in it holds it
    try:
        _, rd_w = run("w", "train.lr=0.004")
    finally:
        os.close(fd)
    assert fake_trainer[-1] == str(rd_w) and len(fake_trainer) == 7  # a c d x y z w


def test_reuse_identical_is_outside_the_hash(in_tmp: Path) -> None:
    from dbkit import config

    on, off = (config.load("params/notes/rank.yaml", [f"train.reuse_identical={v}"]) for v in ("true", "false"))
    # what the hash was before the key existed: the same identity without it
    ident = {k: v for k, v in on.params.items() if k not in config.HASH_EXCLUDE}
    # train.lokr came later too, hashed only away from its default (config.HASH_ADDED_KEYS)
    ident["train"] = {k: v for k, v in ident["train"].items() if k not in ("reuse_identical", "lokr")}
    ident["metrics"] = {k: v for k, v in ident["metrics"].items() if k != "seed"}  # added later, at its old 100
    ident["cpu_threads"] = cpu_threads.identity(on.params)  # threads: 0 is this machine's count
    del ident["threads"]
    ident["base_fingerprint"] = workflow.models.fingerprint(on.params["base"]["model"])
    ident["data_fingerprint"] = workflow.data.data_fingerprint(on.params)
    assert on.hash == off.hash == config.stable_hash(ident)
