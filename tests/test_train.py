"""The DreamBooth trainer's mechanics on a tiny random toy-architecture model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dbkit import captions, config, data, diffusion, export, sample, train, workflow
from dbkit.train import TrainingError

ATTENTION = "[to_q,to_k,to_v,to_out.0]"


def _params(tiny_base, *extra: str) -> dict:
    ov = [f"base.model={tiny_base}", "train.steps=4", "train.batch_size=2", "train.save_every=2",
          "train.sample_every=0", "prior.num_images=2", "prior.steps=2", "experiment=t"] + list(extra)
    return config.load("params/base.yaml", ov).params


def _setup(p: dict):
    folder = data.resolve_folder(p["data"]["instance_images"])
    recs = captions.build_captions(data.build_manifest(folder), p)
    class_dir = None
    if p["prior"]["enabled"]:
        base = workflow.models.resolve(p["base"]["model"])
        class_dir, _ = sample.class_images(lambda: workflow.models.load_pipeline(base, "sd15"), p["base"]["model"], p,
                                           captions.expand(p["prior"]["class_prompt"], p))
    return recs, class_dir


def _train(p, rd, **kw):
    recs, class_dir = _setup(p)
    base = workflow.models.resolve(p["base"]["model"])
    return train.train(p, rd, recs, base_path=base, family="sd15", class_dir=class_dir, progress=False, **kw)


@pytest.mark.parametrize("method,extra", [
    ("lora", []), ("dora", []), ("full", []),
    ("pivotal", ["train.pivotal.enabled=true", "train.pivotal.ti_fraction=0.5"]),
    ("lora-te-only", ["train.unet=false"]), ("minsnr-offset-ema", ["train.min_snr_gamma=5", "train.noise_offset=0.1",
                                                                  "train.ema_decay=0.9"]),
    ("prodigy", ["train.optimizer=prodigy", "train.lr=1.0", "train.text_encoder_lr=1.0", "prior.enabled=false"]),
])
def test_each_method_trains_and_its_output_generates(in_tmp, tiny_base, method, extra):
    m = "dora" if method == "dora" else ("full" if method == "full" else "lora")
    if m == "dora":
        extra = [*extra, f"train.lora.unet_targets={ATTENTION}"]
    p = _params(tiny_base, f"train.method={m}", *extra)
    out = _train(p, in_tmp / "run")
    pipe = export.load_trained(out, tiny_base, "sd15")
    q = train.effective_params(p)
    images = sample.generate(pipe, [captions.expand("a {subject}", q)], [0], steps=2, guidance=2.0)
    assert images[0].size == (64, 64)
    meta = export.read_metadata(out)
    assert meta["steps"] == 4 and meta["tag_frequency"]
    assert len([x for x in (in_tmp / "run" / "train_log.jsonl").read_text().splitlines() if x]) == 4


def test_lora_changes_the_model_and_kohya_file_round_trips(in_tmp, tiny_base):
    # kohya's classic LoRA layout (attention); LoCon-style conv/ff keys are written but their
    # round trip through diffusers' kohya converter is not verified
    p = _params(tiny_base, "prior.enabled=false", f"train.lora.unet_targets={ATTENTION}")
    out = _train(p, in_tmp / "run")
    a = export.load_trained(out, tiny_base, "sd15")
    b = export.load_trained(out, tiny_base, "sd15", lora_file=export.KOHYA_FILE)
    for part in ("unet", "text_encoder"):
        sa = {k: v for k, v in getattr(a, part).state_dict().items() if "lora" in k}
        sb = {k: v for k, v in getattr(b, part).state_dict().items() if "lora" in k}
        assert sa and sa.keys() == sb.keys()
        assert all(torch.allclose(sa[k], sb[k]) for k in sa)
    with safe_open(str(out / export.KOHYA_FILE), "pt") as f:
        md = f.metadata()
        assert md["ss_network_dim"] == "8" and "sks star" in md["ss_tag_frequency"]
        assert any(k.startswith("lora_te_") for k in f.keys()) and any(k.startswith("lora_unet_") for k in f.keys())
    # the LoRA actually does something, and its scale is honoured
    q = train.effective_params(p)
    prompt = [captions.expand("a {subject}", q)]
    base_img = sample.generate(workflow.models.load_pipeline(tiny_base, "sd15"), prompt, [0], steps=2, guidance=1.0)
    zero = sample.generate(export.load_trained(out, tiny_base, "sd15", lora_scale=0.0), prompt, [0], steps=2,
                           guidance=1.0)
    full = sample.generate(a, prompt, [0], steps=2, guidance=1.0)

    def diff(x, y) -> float:
        return float(np.abs(np.asarray(x[0], np.float32) - np.asarray(y[0], np.float32)).mean())

    assert diff(base_img, zero) < 0.5 < diff(base_img, full)


def test_kill_and_resume_ends_with_the_same_weights(in_tmp, tiny_base):
    p = _params(tiny_base, "train.steps=6", "train.save_every=2", "train.keep_checkpoints=1")
    whole = _train(p, in_tmp / "whole")
    part = in_tmp / "part"
    _train(p, part, max_steps=3)  # "killed" after step 3: last checkpoint is step 2
    assert [c.name for c in (part / "checkpoints").iterdir()] == ["checkpoint-000002"]
    resumed = _train(p, part)
    from safetensors.torch import load_file

    a, b = load_file(whole / export.LORA_FILE), load_file(resumed / export.LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prior_loss_weights_each_half_by_its_own_snr():
    per = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.tensor([0.5, 1.0, 0.1, 0.2])
    loss, inst, prior = diffusion.dreambooth_loss(per, w, 2, prior_weight=2.0)
    assert inst.item() == pytest.approx((0.5 + 2.0) / 2)
    assert prior.item() == pytest.approx((0.3 + 0.8) / 2)
    assert loss.item() == pytest.approx(inst.item() + 2 * prior.item())


def test_min_snr_weights_cap_low_noise_steps():
    from diffusers import DDPMScheduler

    s = DDPMScheduler(num_train_timesteps=1000)
    w = diffusion.snr_weights(s, torch.tensor([1, 500, 999]), 5.0, "epsilon")
    assert w[0] < 0.01 and w[2] == pytest.approx(1.0)
    assert torch.equal(diffusion.snr_weights(s, torch.tensor([1, 2]), 0.0, "epsilon"), torch.ones(2))


def test_impossible_combinations_fail_before_training(in_tmp, tiny_base):
    p = _params(tiny_base, "train.pivotal.enabled=true", "captions.trigger=none")
    with pytest.raises(TrainingError, match="captions.trigger"):
        train.check_combination(p, "sd15")
    p = _params(tiny_base, "train.optimizer=prodigy")
    with pytest.raises(TrainingError, match="lr"):
        train.check_combination(p, "sd15")
    p = _params(tiny_base, "train.method=dora")  # default targets include ResNet convs
    with pytest.raises(TrainingError, match="unet_targets"):
        train.check_combination(p, "sd15")


def test_dora_refuses_targets_that_are_convolutions_in_this_unet(in_tmp, tiny_base):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_base / "unet")
    assert not unet.config.use_linear_projection  # SD1.x style: proj_in is a 1×1 convolution
    with pytest.raises(TrainingError, match=r"\['proj_in'\].*unet_targets"):
        train.refuse_dora_convs(unet, ["to_q", "proj_in"])
    train.refuse_dora_convs(unet, ["to_q", "to_k", "ff.net.2"])


def test_nan_loss_stops_with_a_clear_message(in_tmp, tiny_base):
    p = _params(tiny_base, "train.lr=1e30", "train.max_grad_norm=0", "train.steps=30", "prior.enabled=false")
    with pytest.raises(TrainingError, match="lower train.lr"):
        _train(p, in_tmp / "run")


def test_data_order_is_a_function_of_the_step():
    a = [train.epoch_indices(5, s, 2, 0, 0) for s in range(5)]
    b = [train.epoch_indices(5, s, 2, 0, 0) for s in range(5)]
    assert a == b
    flat = [i for x in a for i in x]
    assert sorted(flat[:5]) == list(range(5))  # one epoch visits every image once


def test_bf16_keeps_trainable_weights_in_fp32(in_tmp, tiny_base):
    p = _params(tiny_base, "train.mixed_precision=bf16", "prior.enabled=false", "train.steps=2")
    parts = train.load_parts(tiny_base, "sd15", p)
    train.apply_method(parts, p)
    train.cast_frozen_weights(parts, p["train"], "bf16")
    trainable = [q for q in parts.unet.parameters() if q.requires_grad]
    frozen = [q for q in parts.unet.parameters() if not q.requires_grad]
    assert trainable and all(q.dtype == torch.float32 for q in trainable)
    assert all(q.dtype == torch.bfloat16 for q in frozen)
    out = _train(p, in_tmp / "run")
    assert (out / export.LORA_FILE).exists()


def test_missing_tracker_package_is_an_early_error(in_tmp, tiny_base):
    p = _params(tiny_base, "train.log_with=wandb")
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(TrainingError, match="pip install wandb"):
        train.check_combination(p, "sd15")


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(in_tmp, tiny_base):
    """A real kill (SIGKILL of `dbkit train`), not a simulated stop."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parent.parent
    params = in_tmp / "k.yaml"
    params.write_text(f"extends: {root / 'params' / 'base.yaml'}\nbase: {{model: {tiny_base}}}\n"
                      "prior: {enabled: false}\ntrain: {steps: 60, batch_size: 2, save_every: 10, "
                      "keep_checkpoints: 2, sample_every: 0}\n")
    env = {**os.environ, "PYTHONPATH": str(root)}

    def run(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "dbkit.cli", "train", str(params), "-p", f"experiment={name}"],
                                cwd=in_tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    assert run("whole").wait(timeout=300) == 0
    proc = run("killed")
    deadline = time.time() + 300
    while not list((in_tmp / "runs" / "killed").glob("*/checkpoints/checkpoint-000020")):
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rd = next((in_tmp / "runs" / "killed").iterdir())
    assert not (rd / "output").exists()
    assert run("killed").wait(timeout=300) == 0
    a = load_file(next((in_tmp / "runs" / "whole").iterdir()) / "output" / export.LORA_FILE)
    b = load_file(rd / "output" / export.LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (rd / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))  # the log, too, reads as one run


def test_aspect_ratio_buckets_keep_shapes_and_batches_share_one(in_tmp, tiny_base):
    from PIL import Image

    folder = in_tmp / "photos"
    folder.mkdir()
    for k, size in enumerate([(96, 64), (100, 66), (64, 96), (64, 64)]):
        Image.new("RGB", size, (40 * k, 90, 200)).save(folder / f"{k}.png")
    p = _params(tiny_base, f"data.instance_images={folder}", "data.buckets=true", "train.batch_size=2",
                "prior.num_images=2")
    recs = captions.build_captions(data.build_manifest(folder), p)
    ex = train.load_examples(recs, p)
    assert [e.bucket for e in ex] == [(80, 48), (80, 48), (56, 72), (64, 64)]
    assert tuple(ex[0].pixels.shape) == (3, 48, 80)
    for step in range(6):
        assert len({ex[i].bucket for i in train.batch_indices(ex, step, 2, 0, 0)}) == 1
    out = _train(p, in_tmp / "run")  # class images (square) are fitted to each batch's bucket
    assert (out / export.LORA_FILE).exists()


def test_random_crops_are_not_cached_and_still_train(in_tmp, tiny_base):
    from PIL import Image

    folder = in_tmp / "wide"
    folder.mkdir()
    for k in range(2):
        Image.new("RGB", (128, 64), (200, 30 * k, 40)).save(folder / f"{k}.png")
    p = _params(tiny_base, f"data.instance_images={folder}", "data.center_crop=false", "prior.enabled=false")
    ex = train.load_examples(captions.build_captions(data.build_manifest(folder), p), p)
    assert tuple(ex[0].pixels.shape) == (3, 64, 128)  # cropped per step, not here
    g = torch.Generator().manual_seed(0)
    assert tuple(train.crop(ex[0].pixels, 64, g).shape) == (3, 64, 64)
    assert (_train(p, in_tmp / "run") / export.LORA_FILE).exists()
