"""Gradient accumulation: a step is one optimizer update of train.grad_accum micro-batches;
the LR schedule and the EMA advance per update, and resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dbkit import captions, config, data, export, train

LR = 0.002


def _params(tiny_base, *extra: str) -> dict:
    # small (32 px, attention LoRA, no prior): 4 updates × 4 micro-batches, LoRA dropout on
    return config.load("params/base.yaml", [
        f"base.model={tiny_base}", "data.resolution=32", "train.steps=4", "train.batch_size=1", "train.grad_accum=4",
        "train.save_every=2", "train.keep_checkpoints=1", "train.sample_every=0", "train.lr_scheduler=linear",
        "train.warmup_steps=2", f"train.lr={LR}", "train.ema_decay=0.9", "train.lora.dropout=0.1",
        "train.lora.unet_targets=[to_q,to_k,to_v,to_out.0]", "prior.enabled=false", "experiment=t", *extra]).params


def _train(p, rd, **kw):
    recs = captions.build_captions(data.build_manifest(data.resolve_folder(p["data"]["instance_images"])), p)
    return train.train(p, rd, recs, base_path=Path(p["base"]["model"]), family="sd15", progress=False, **kw)


def _log(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_accumulated_run_resumes_bit_identically_with_per_update_schedule_and_ema(in_tmp, tiny_base):
    p = _params(tiny_base)
    whole = in_tmp / "whole"
    out = _train(p, whole)
    part = in_tmp / "part"
    _train(p, part, max_steps=3)  # "killed" after update 3 (micro-batch 12): the last checkpoint is update 2
    ckpt = part / "checkpoints" / "checkpoint-000002"
    assert [c.name for c in (part / "checkpoints").iterdir()] == [ckpt.name]
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["ema"]["optimization_step"] == 2  # two updates, not eight micro-batches
    resumed = _train(p, part)

    a, b = load_file(out / export.LORA_FILE), load_file(resumed / export.LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("elapsed_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in _log(part)] == \
           [{k: v for k, v in r.items() if k not in drop} for r in _log(whole)]
    # diffusers' linear warmup/decay over 4 updates, warmup 2, read after each update (k = 1…4):
    # k/2 while warming up, then (4 - k)/(4 - 2)
    assert [r["lr"] for r in _log(whole)] == [LR * f for f in (1 / 2, 1, 1 / 2, 0)]


@pytest.mark.parametrize("name,warmup,expected", [
    ("linear", 0, [3 / 4, 2 / 4, 1 / 4, 0]),
    ("linear", 1, [1, 2 / 3, 1 / 3, 0]),
    ("constant", 2, [1 / 2, 1, 1, 1]),  # "constant" honours warmup_steps too
    ("constant", 0, [1, 1, 1, 1]),
])
def test_lr_schedule_is_counted_in_updates(name, warmup, expected):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = train.make_lr_schedule(opt, {"lr_scheduler": name, "warmup_steps": warmup, "steps": 4})
    lrs = []
    for _ in range(4):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([LR * f for f in expected], abs=1e-15)


def test_a_checkpoint_from_another_accumulation_is_refused(in_tmp, tiny_base):
    p = _params(tiny_base, "train.steps=2", "train.save_every=1", "train.grad_accum=1")
    rd = in_tmp / "run"
    _train(p, rd, max_steps=1)
    q = _params(tiny_base, "train.steps=2", "train.save_every=1")
    with pytest.raises(train.TrainingError, match="grad_accum=4"):
        _train(q, rd)
