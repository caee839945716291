"""Masked loss (train.masked_loss): only the subject's latent positions count, the mask follows
its photo through every crop, resize and flip, and class images stay unmasked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dbkit import config, data, diffusion, masks, train
from dbkit.data import DataError

RES = 64


def _mask_array(w: int, h: int) -> np.ndarray:
    """An asymmetric subject: a block in the upper left whose right edge cuts a latent cell
    in half (x 0..21 at 4 px per latent position), so one column carries weight 0.5."""
    m = np.zeros((h, w), np.uint8)
    m[8:40, 0:22] = 255
    return m


def _photo_with_mask(folder: Path, name: str, size=(RES, RES), how: str = "file", seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    m = _mask_array(*size)
    if how == "alpha":
        Image.fromarray(np.dstack([rgb, m]), "RGBA").save(folder / name)
    else:
        Image.fromarray(rgb).save(folder / name)
        if how == "file":
            Image.fromarray(m, "L").save(masks.mask_path(folder / name))
    return folder / name


def _grey_photo_of_its_mask(folder: Path, name: str, size: tuple[int, int]) -> dict:
    """A photo whose pixels *are* its mask (grey = mask value), mask saved beside it: wherever
    the pipeline takes the photo, the mask it carries must equal the photo's own pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    m = np.zeros((h, w), np.uint8)
    m[5 : h - 9, 3 : w // 3] = 255       # asymmetric: left third, off-centre vertically
    m[h // 2 :, w - 12 : w - 4] = 128    # and a grey patch low on the right
    Image.fromarray(np.dstack([m, m, m])).save(folder / name)
    Image.fromarray(m, "L").save(masks.mask_path(folder / name))
    return {"file": str(folder / name), "caption": "a sks star", "tags": ["a sks star"]}


def _pixels_as_mask(ex: train.Example) -> torch.Tensor:
    return (ex.pixels[:1] + 1) / 2


# --------------------------------------------------------------------------- the loss itself


def test_masked_mean_is_the_mean_over_the_mask_and_zero_gradient_outside():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, :3, :5] = 1.0
    mask[0, 0, 3, :5] = 0.25
    mask[1, 0, 4:, 2:] = 1.0
    per = diffusion.per_sample_loss(None, pred, noise, noise, None, "epsilon", mask)
    # by hand: Σ m·(pred − noise)² / (Σ m · channels), per sample
    err = (pred.detach() - noise) ** 2
    want = torch.stack([(err[b] * mask[b]).sum() / (mask[b].sum() * 4) for b in range(2)])
    assert torch.allclose(per.detach(), want, rtol=1e-6)
    per.sum().backward()
    outside = (mask == 0).expand_as(pred)
    assert torch.all(pred.grad[outside] == 0)
    assert torch.all(pred.grad[~outside] != 0)
    # an all-ones mask is the unmasked loss, exactly
    ones = diffusion.per_sample_loss(None, pred, noise, noise, None, "epsilon", torch.ones(2, 1, 8, 8))
    assert torch.allclose(ones, diffusion.per_sample_loss(None, pred, noise, noise, None, "epsilon"), rtol=1e-6)


def test_latent_mask_is_the_share_of_subject_pixels_per_latent_cell():
    m = torch.from_numpy(_mask_array(RES, RES).astype(np.float32) / 255)[None, None]
    by_hand = m.reshape(1, 1, 16, 4, 16, 4).mean(dim=(3, 5))  # 4×4 pixel blocks
    assert torch.equal(diffusion.latent_mask(m, (16, 16)), by_hand)
    assert by_hand[0, 0, 2, 5] == 0.5 and by_hand[0, 0, 2, 4] == 1 and by_hand[0, 0, 0, 0] == 0


def test_training_step_counts_only_the_subject_and_leaves_class_images_unmasked(in_tmp, tiny_base, monkeypatch):
    """The real step (setup_training + batch_loss on a tiny random base, prior on): the
    gradient reaching the UNet's prediction is exactly zero at the instance images' latent
    positions outside the mask, non-zero inside and everywhere in the class images, and
    the losses equal a computation with plain torch from the step's own tensors."""
    inst, klass = in_tmp / "photos", in_tmp / "class"
    for k in range(2):
        _photo_with_mask(inst, f"{k}.png", seed=k)
        _photo_with_mask(klass, f"c{k}.png", how="none", seed=10 + k)
    p = config.load("params/base.yaml", [f"base.model={tiny_base}", f"data.instance_images={inst}",
                                         f"data.class_images={klass}", "train.masked_loss=true", "train.batch_size=2",
                                         "prior.weight=0.7", "experiment=t"]).params
    recs = [{"file": str(inst / f"{k}.png"), "caption": "a sks star", "tags": ["a sks star"]} for k in range(2)]
    tr = train.setup_training(p, in_tmp / "run", recs, tiny_base, "sd15", klass)
    assert all(e.mask is not None for e in tr.instance) and all(e.mask is None for e in tr.klass)

    seen = {}
    real = diffusion.per_sample_loss

    def spy(sched, pred, latents, noise, n, objective, mask=None):
        pred.retain_grad()
        seen.update(pred=pred, latents=latents, noise=noise, t=n.timesteps, objective=objective)
        return real(sched, pred, latents, noise, n, objective, mask)

    monkeypatch.setattr(diffusion, "per_sample_loss", spy)
    batch = tr.instance[:2] + tr.klass[:2]
    prompts = ["a sks star"] * 2 + [tr.prior_prompt] * 2
    loss, l_inst, l_prior = train.batch_loss(tr, batch, prompts, 2, torch.Generator().manual_seed(5), False)
    loss.backward()

    pred, lat = seen["pred"], seen["latents"]
    h, w = lat.shape[-2:]
    f = RES // h
    m = torch.from_numpy(_mask_array(RES, RES).astype(np.float32) / 255).reshape(h, f, w, f).mean(dim=(1, 3))
    grad = pred.grad
    assert torch.all(grad[:2, :, m == 0] == 0)
    assert torch.all(grad[:2, :, m > 0] != 0)
    assert torch.all(grad[2:] != 0)  # the prior loss sees every position

    # the v-prediction target and the losses by hand
    assert seen["objective"] == "v_prediction"
    ac = tr.parts.noise_scheduler.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1).float()
    v = ac.sqrt() * seen["noise"] - (1 - ac).sqrt() * lat
    err = (pred.detach().float() - v) ** 2
    c = err.shape[1]
    inst_by_hand = torch.stack([(err[b] * m).sum() / (m.sum() * c) for b in range(2)]).mean()
    prior_by_hand = err[2:].mean()
    assert torch.allclose(l_inst.detach(), inst_by_hand, rtol=1e-5)
    assert torch.allclose(l_prior.detach(), prior_by_hand, rtol=1e-5)
    assert torch.allclose(loss.detach(), inst_by_hand + 0.7 * prior_by_hand, rtol=1e-5)


# --------------------------------------------------------------------------- the mask follows its photo


def test_mask_is_cropped_like_its_photo_at_random_crops_and_flips(tmp_path, tiny_base):
    from diffusers import AutoencoderKL

    rec = _grey_photo_of_its_mask(tmp_path / "p", "wide.png", (150, 64))
    p = config.load("params/base.yaml", ["data.center_crop=false", "data.flip=true", "train.masked_loss=true"],
                    check_files=False).params
    plain, mirrored = train.load_examples([rec], p, masks=True)
    for ex in (plain, mirrored):
        assert ex.mask.shape == (1, 64, 150)
        assert torch.allclose(ex.mask, _pixels_as_mask(ex), atol=1e-6)
    assert not torch.equal(plain.mask, mirrored.mask)  # asymmetric: the flip shows
    batch = [plain, plain, mirrored]
    train.sample_latents(AutoencoderKL.from_pretrained(tiny_base / "vae"), batch, torch.Generator().manual_seed(1), 64)
    offsets = {b.crop_top_left for b in batch}
    assert len(offsets) > 1  # the windows differ, and each mask is its own window's
    for b in batch:
        assert b.mask.shape == (1, 64, 64)
        assert torch.allclose(b.mask, _pixels_as_mask(b), atol=1e-6)
        y, x = b.crop_top_left
        src = plain if b.mask is not None and torch.equal(b.pixels, plain.pixels[:, y:y + 64, x:x + 64]) else mirrored
        assert torch.equal(b.mask, src.mask[:, y:y + 64, x:x + 64])


@pytest.mark.parametrize("opts,size", [
    (["data.center_crop=true"], (150, 64)),            # centre crop, no resize
    (["data.center_crop=true"], (97, 211)),            # resized and cropped
    (["data.buckets=true", "data.flip=true"], (96, 64)),   # bucket 80×48: resized
])
def test_mask_follows_resize_center_crop_and_buckets(tmp_path, opts, size):
    rec = _grey_photo_of_its_mask(tmp_path / "p", "a.png", size)
    p = config.load("params/base.yaml", [*opts, "train.masked_loss=true"], check_files=False).params
    for ex in train.load_examples([rec], p, masks=True):
        assert ex.mask.shape[1:] == ex.pixels.shape[1:]
        # the same resampling per channel: the mask equals the grey photo's pixels exactly
        assert torch.allclose(ex.mask, _pixels_as_mask(ex), atol=1e-6)
        assert 0 < ex.mask.mean() < 1


def test_mask_from_the_alpha_channel(tmp_path):
    f = _photo_with_mask(tmp_path / "p", "cut.png", how="alpha")
    m = masks.load_mask(f)
    assert np.array_equal(np.asarray(m), _mask_array(RES, RES))
    p = config.load("params/base.yaml", ["train.masked_loss=true"], check_files=False).params
    (ex,) = train.load_examples([{"file": str(f), "caption": "x", "tags": ["x"]}], p, masks=True)
    assert torch.equal(ex.mask[0], torch.from_numpy(_mask_array(RES, RES).astype(np.float32) / 255))


def test_a_photo_without_a_mask_is_an_error_naming_it(in_tmp):
    folder = in_tmp / "p"
    _photo_with_mask(folder, "a.png")
    bare = _photo_with_mask(folder, "b.png", how="none")
    p = config.load("params/base.yaml", [f"data.instance_images={folder}", "train.masked_loss=true"],
                    check_files=False).params
    with pytest.raises(DataError, match=r"b\.png.*b\.mask\.png.*alpha"):
        train.load_examples([{"file": str(bare), "caption": "x", "tags": ["x"]}], p, masks=True)
    with pytest.raises(config.ConfigError, match=r"train\.masked_loss.*1 photo.*b\.png.*mask\.png"):
        config.load("params/base.yaml", [f"data.instance_images={folder}", "train.masked_loss=true"])
    # a mask of the wrong size is named too
    Image.new("L", (10, 10)).save(masks.mask_path(bare))
    with pytest.raises(DataError, match=r"b\.mask\.png.*10×10.*64×64"):
        masks.load_mask(bare)


def test_toy_world_masks_come_from_the_oracle_and_cover_the_subject(in_tmp):
    from dbkit.toyworld import subjects

    s = subjects.get("eyed_heart")
    folder = data.resolve_folder("toyworld:eyed_heart")
    for k, (_bg, pos, size) in enumerate(subjects.contexts(s)):
        m = np.asarray(masks.load_mask(folder / f"{k + 1:02d}.png", toy=True)) > 127
        assert masks.load_mask(folder / f"{k + 1:02d}.png") is None  # only the toy world has this source
        dx, dy = (k % 3) - 1, (k % 2) * 2 - 1  # subjects.photos' jitter
        body = subjects._body(s, pos, size, dx, dy)[0]
        cover = body.reshape(64, 4, 64, 4).mean(axis=(1, 3)) >= 0.5
        iou = (m & cover).sum() / (m | cover).sum()
        assert iou > 0.9, (k, iou)


@pytest.mark.parametrize("crop", ["data.center_crop=true", "data.center_crop=false"])
def test_masked_training_runs_on_the_toy_world(in_tmp, tiny_base, crop):
    """A few real steps through train.train: cached latents with fixed crops, and random
    crops taken at each step (masks cropped with them)."""
    from dbkit import captions, export

    p = config.load("params/base.yaml", [f"base.model={tiny_base}", "data.instance_images=toyworld:eyed_heart",
                                         "train.masked_loss=true", crop, "data.resolution=48", "prior.enabled=false",
                                         "train.steps=2", "train.batch_size=2", "train.save_every=0",
                                         "train.sample_every=0", "experiment=t"]).params
    folder = data.resolve_folder(p["data"]["instance_images"])
    recs = captions.build_captions(data.build_manifest(folder), captions.effective_params(p))
    out = train.train(p, in_tmp / "run", recs, base_path=tiny_base, family="sd15", progress=False)
    assert (out / export.LORA_FILE).exists()
    log = [line for line in (in_tmp / "run" / "train_log.jsonl").read_text().splitlines() if line]
    assert len(log) == 2
