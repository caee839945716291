"""The DreamBooth trainer's mechanics on a tiny random toy-architecture model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dbkit import captions, config, data, diffusion, export, methods, sample, train, workflow
from dbkit.methods import lora
from dbkit.train import TrainingError

ATTENTION = "[to_q,to_k,to_v,to_out.0]"


def _params(tiny_base, *extra: str) -> dict:
    ov = [f"base.model={tiny_base}", "train.steps=4", "train.batch_size=2", "train.save_every=2",
          "train.sample_every=0", "prior.num_images=2", "prior.steps=2", "experiment=t"] + list(extra)
    return config.load("params/base.yaml", ov).params


def _setup(p: dict):
    folder = data.resolve_folder(p["data"]["instance_images"])
    recs = captions.build_captions(data.build_manifest(folder), captions.effective_params(p))
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
    pipe = methods.load_trained(out, tiny_base, "sd15")
    q = captions.effective_params(p)
    images = sample.generate(pipe, [captions.expand("a {subject}", q)], [0], steps=2, guidance=2.0)
    assert images[0].size == (64, 64)
    meta = export.read_metadata(out)
    assert meta["steps"] == 4 and meta["tag_frequency"]
    assert len([x for x in (in_tmp / "run" / "train_log.jsonl").read_text().splitlines() if x]) == 4


def test_lora_scale_is_honoured(in_tmp, tiny_base):
    # that each file reproduces the trained model is tests/test_identity.py's job
    p = _params(tiny_base, "prior.enabled=false", f"train.lora.unet_targets={ATTENTION}")
    out = _train(p, in_tmp / "run")
    a = methods.load_trained(out, tiny_base, "sd15")
    # the LoRA actually does something, and its scale is honoured
    q = captions.effective_params(p)
    prompt = [captions.expand("a {subject}", q)]
    base_img = sample.generate(workflow.models.load_pipeline(tiny_base, "sd15"), prompt, [0], steps=2, guidance=1.0)
    zero = sample.generate(methods.load_trained(out, tiny_base, "sd15", lora_scale=0.0), prompt, [0], steps=2,
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
    with pytest.raises(config.ConfigError, match="captions.trigger"):  # params load refuses it first
        _params(tiny_base, "train.pivotal.enabled=true", "captions.trigger=none")
    with pytest.raises(config.ConfigError, match=r"'train\.lr' is 0\.002 but train\.optimizer=prodigy"):
        _params(tiny_base, "train.optimizer=prodigy")
    p = _params(tiny_base)
    p["train"]["optimizer"] = "prodigy"  # params built without config.load are still checked
    with pytest.raises(TrainingError, match="lr"):
        train.check_combination(p, "sd15")
    p = _params(tiny_base)
    p["captions"]["trigger"], p["train"]["pivotal"]["enabled"] = "none", True
    with pytest.raises(TrainingError, match="captions.trigger"):
        train.check_combination(p, "sd15")
    # DoRA with the default targets trains: the convolutions of this UNet are left out at load
    p = _params(tiny_base, "train.method=dora")
    assert p["train"]["lora"]["unet_targets"] == ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    train.check_combination(p, "sd15")
    p["train"]["lora"]["unet_targets"] = ["to_q", "conv1"]  # a list written by hand is refused instead
    with pytest.raises(TrainingError, match="unet_targets"):
        train.check_combination(p, "sd15")


def test_dora_refuses_targets_that_are_convolutions_in_this_unet(in_tmp, tiny_base):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_base / "unet")
    assert not unet.config.use_linear_projection  # SD1.x style: proj_in is a 1×1 convolution
    with pytest.raises(methods.ParamsProblem, match=r"\['proj_in'\].*unet_targets"):
        lora.refuse_dora_convs(unet, ["to_q", "proj_in"])
    lora.refuse_dora_convs(unet, ["to_q", "to_k", "ff.net.2"])


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
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(config.ConfigError, match="pip install wandb"):  # at params load
        _params(tiny_base, "train.log_with=wandb")
    p = _params(tiny_base)
    p["train"]["log_with"] = "wandb"
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
                      "keep_checkpoints: 2, sample_every: 0, reuse_identical: false}\n")  # the same params
    # twice: without this the second run would copy the first (dbkit.reuse) instead of training
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
    recs = captions.build_captions(data.build_manifest(folder), captions.effective_params(p))
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


# --------------------------------------------------------------------------- SDXL size/crop conditioning


def _photo(folder: Path, name: str, size: tuple[int, int]):
    from PIL import Image

    rng = np.random.default_rng(len(name) + size[0])
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    return {"file": str(folder / name), "caption": "a sks star", "tags": ["a sks star"]}


def _script_center_crop(width: int, height: int, res: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """diffusers' train_dreambooth_lora_sdxl.py: original (h, w), then Resize(res) (short side
    to res, as torchvision rounds it) and the centre crop's (y1, x1)."""
    s = res / min(width, height)
    w, h = (res, int(height * s)) if width <= height else (int(width * s), res)
    return (height, width), (max(0, round((h - res) / 2.0)), max(0, round((w - res) / 2.0)))


def test_size_ids_follow_the_diffusers_sdxl_script(tmp_path):
    from PIL import ImageOps

    p = config.load("params/base.yaml", ["data.flip=true"], check_files=False).params
    rec = _photo(tmp_path, "wide.png", (300, 200))
    plain, mirrored = train.load_examples([rec], p)
    original, (y1, x1) = _script_center_crop(300, 200, 64)
    assert train.size_ids(plain, 64) == [*original, y1, x1, 64, 64] == [200, 300, 0, 16, 64, 64]
    assert train.size_ids(mirrored, 64) == [200, 300, 0, 16, 64, 64]  # 96 − 16 − 64: symmetric here
    # the pixels are those of the centre crop as before (resize short side, crop the middle)
    im = data.open_rgb(Path(rec["file"]))
    assert torch.equal(plain.pixels, data.to_tensor(data.crop_resize(im, 64, center=True)))

    rec = _photo(tmp_path, "odd.png", (310, 200))  # resized to 99 × 64: crop at 17, mirrored at 18
    plain, mirrored = train.load_examples([rec], p)
    assert plain.crop_top_left == (0, 17) and mirrored.crop_top_left == (0, 99 - 17 - 64)
    scaled = data.scale_short_side(data.open_rgb(Path(rec["file"])), 64)
    assert data.to_image(mirrored.pixels) == ImageOps.mirror(scaled).crop((18, 0, 82, 64))


def test_size_ids_with_buckets_and_class_images_fitted_to_them(tmp_path):
    p = config.load("params/base.yaml", ["data.buckets=true"], check_files=False).params
    (ex,) = train.load_examples([_photo(tmp_path, "a.png", (96, 64))], p)
    # bucket 80×48: the photo scaled by 80/96 to 80×53, rows 2..50 kept; target = the bucket (h, w)
    assert ex.bucket == (80, 48) and train.size_ids(ex, 64) == [64, 96, 2, 0, 48, 80]
    q = config.load("params/base.yaml", check_files=False).params
    (cls,) = train.load_examples([_photo(tmp_path, "c.png", (96, 64))], q)
    assert cls.crop_top_left == (0, 16)
    fitted = train.fit_to(cls, (80, 48))
    # = the photo scaled by 1.25 (120×80) and cropped to 80×48 at (top 16, left 16·1.25)
    assert train.size_ids(fitted, 64) == [64, 96, 16, 20, 48, 80]


def test_random_crops_record_their_offset_for_the_step(tmp_path, tiny_base):
    from diffusers import AutoencoderKL

    p = config.load("params/base.yaml", ["data.center_crop=false"], check_files=False).params
    ex = train.load_examples([_photo(tmp_path, "w.png", (128, 64))], p)
    batch = [ex[0], ex[0]]
    train.sample_latents(AutoencoderKL.from_pretrained(tiny_base / "vae"), batch, torch.Generator().manual_seed(3), 64)
    g = torch.Generator().manual_seed(3)  # the same draws by hand: (y, x) per example
    expected = [(int(torch.randint(0, 1, (1,), generator=g)), int(torch.randint(0, 65, (1,), generator=g)))
                for _ in range(2)]
    assert [b.crop_top_left for b in batch] == expected and ex[0].crop_top_left == (0, 0)
    for b, (y, x) in zip(batch, expected):
        assert torch.equal(b.pixels, ex[0].pixels[:, y:y + 64, x:x + 64])
        assert train.size_ids(b, 64) == [64, 128, y, x, 64, 64]


def test_encode_text_builds_time_ids_per_sample_like_the_sdxl_pipeline(tmp_path):
    from dbkit import models

    base = models.build_random("sdxl", tmp_path / "sdxl")
    p = config.load("params/base.yaml", check_files=False).params
    parts = train.load_parts(base, "sdxl", p)
    exs = [train.Example(torch.zeros(3, 64, 64), {}, original_size=(200, 300), crop_top_left=(0, 16)),
           train.Example(torch.zeros(3, 48, 80), {}, bucket=(80, 48), original_size=(64, 96), crop_top_left=(2, 0))]
    with torch.no_grad():
        _, added = train.encode_text(parts, ["a sks star", "a star"], None, 64, examples=exs)
        _, default = train.encode_text(parts, ["a sks star"], None, 64)
    pipe = models.load_pipeline(base, "sdxl")
    dim = pipe.text_encoder_2.config.projection_dim
    ref = torch.cat([pipe._get_add_time_ids((200, 300), (0, 16), (64, 64), torch.float32, dim),
                     pipe._get_add_time_ids((64, 96), (2, 0), (48, 80), torch.float32, dim)])
    assert torch.equal(added["time_ids"], ref)
    assert default["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]


def test_adamw_matches_torchs_default_loop_bit_for_bit():
    """make_optimizer asks for the foreach kernels (speed); the reference is torch's per-tensor
    AdamW loop, the CPU default, on the same parameters, groups and gradients."""
    def model_and_groups():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4)),
              torch.nn.Parameter(torch.randn(3, 3))]
        return ps, [{"params": ps[:2], "lr": 2e-3}, {"params": ps[2:], "lr": 4e-4}, {"params": [], "lr": 1.0}]

    ours, g1 = model_and_groups()
    ref, g2 = model_and_groups()
    opt = train.make_optimizer(g1, {"optimizer": "adamw", "weight_decay": 0.01})
    reference = torch.optim.AdamW([g for g in g2 if g["params"]], weight_decay=0.01, foreach=False)
    assert opt.defaults["foreach"] is True
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        grads = [torch.randn(q.shape, generator=gen) for q in ours]
        for q, r, g in zip(ours, ref, grads):
            q.grad, r.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
    for q, r in zip(ours, ref):
        assert torch.equal(q, r)


def test_previews_leave_the_trained_weights_unchanged(in_tmp, tiny_base):
    """A preview at every step (drawing through the live modules, with LoRA dropout drawing
    from the global RNG in training) trains the same weights as no preview: a params file
    may thin its previews (params/demo.yaml) without changing any result."""
    from safetensors.torch import load_file

    extra = ("train.lora.dropout=0.1", "prior.enabled=false", "sample.steps=2", "sample.seeds=[0]",
             "train.save_every=0")
    quiet = _train(_params(tiny_base, *extra), in_tmp / "quiet")
    drawn = []
    busy = _train(_params(tiny_base, *extra, "train.sample_every=1"), in_tmp / "busy",
                  preview=lambda step, pipe: drawn.append(pipe("a star", num_inference_steps=2, output_type="np",
                                                                 height=32, width=32).images))
    assert len(drawn) == 4
    a, b = load_file(quiet / export.LORA_FILE), load_file(busy / export.LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_dropout_is_on_while_training(in_tmp, tiny_base):
    """As diffusers' script calls unet.train(): from_pretrained leaves eval mode, in which the
    LoRA dropout would depend on whether a preview had already run."""
    p = train.effective_params(_params(tiny_base, "train.lora.dropout=0.1", "prior.enabled=false"))
    recs, _ = _setup(p)
    tr = train.setup_training(p, in_tmp / "run", recs, workflow.models.resolve(p["base"]["model"]), "sd15", None)
    drops = [m for name in ("unet", "text_encoder") for n, m in tr.modules[name].named_modules()
             if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.training for m in drops)
    with train.sampling_mode(tr.modules, 1.0):  # what every preview does
        assert not any(m.training for m in drops)
    assert all(m.training for m in drops)
    assert not tr.parts.vae.training  # frozen parts stay in eval mode
