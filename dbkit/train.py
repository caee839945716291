"""The DreamBooth training loop: LoRA / DoRA / full fine-tuning, pivotal tuning, prior
preservation, Min-SNR, offset noise, EMA, checkpoints with resume, previews during training.

One loop for every method, driven by the params (see params/base.yaml, section `train`).
It runs under `accelerate launch` on several GPUs unchanged (DDP), and on a laptop CPU.

Determinism: every random choice of micro-batch `s` (which images, captions, noise, timesteps,
LoRA dropout) comes from generators seeded by (seed, s, process), never from state carried
between steps, so a run resumed from a checkpoint ends with exactly the weights of an
uninterrupted one. A step is one optimizer update of train.grad_accum micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pickle
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import captions as cap
from . import data, diffusion
from . import masks as mk
from .captions import effective_params, pivotal_tokens
from .files import atomic_write_json, atomic_write_text, intact_checkpoints


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and which knob to turn."""


XL_FAMILIES = ("sdxl", "playground")


@dataclasses.dataclass
class Parts:
    tokenizers: list  # one per text encoder (SDXL and Playground have two)
    text_encoders: list[torch.nn.Module]
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    family: str
    objective: str  # epsilon | v_prediction | edm

    @property
    def te_names(self) -> list[str]:
        return ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]


def objective_of(p: dict, family: str, sched_config: dict) -> str:
    """What the UNet learns to predict: the base's own objective unless train.prediction says
    otherwise; EDM only where the base was trained that way."""
    base = "edm" if family == "playground" else sched_config.get("prediction_type", "epsilon")
    want = p["train"]["prediction"]
    if want == "auto":
        return base
    if (want == "edm") != (base == "edm"):
        raise TrainingError(f"train.prediction={want} on a {family} base (trained with {base}): EDM training needs an "
                            "EDM-trained base such as Playground v2.5; set train.prediction: auto")
    return want


def load_parts(path: Path, family: str, p: dict) -> Parts:
    from diffusers import AutoencoderKL, DDPMScheduler, EDMEulerScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    suffixes = ["", "_2"] if family in XL_FAMILIES else [""]
    classes = [CLIPTextModel, CLIPTextModelWithProjection]
    sched_config = DDPMScheduler.load_config(path / "scheduler")
    objective = objective_of(p, family, sched_config)
    if objective == "edm":
        sched = EDMEulerScheduler.from_config(sched_config)
    else:
        sched = DDPMScheduler.from_config(sched_config, prediction_type=objective)
    return Parts(
        tokenizers=[CLIPTokenizer.from_pretrained(path / f"tokenizer{x}") for x in suffixes],
        text_encoders=[c.from_pretrained(path / f"text_encoder{x}") for c, x in zip(classes, suffixes)],
        vae=AutoencoderKL.from_pretrained(path / "vae"),
        unet=UNet2DConditionModel.from_pretrained(path / "unet"),
        noise_scheduler=sched,
        family=family,
        objective=objective,
    )


def check_combination(p: dict, family: str) -> None:
    """Refuse combinations that cannot train. config.load makes these checks when the params
    are loaded (before any data work); this repeats them for params built another way."""
    from .config import ConfigError, check_training

    try:
        check_training(p, family)
    except ConfigError as e:
        raise TrainingError(str(e)) from None


def check_pivotal_captions(records: list[dict], p: dict) -> None:
    """Pivotal tokens learn only from captions that contain them; captions built from the
    params before the identifier was replaced would leave them at their initialisation."""
    if not p["train"]["pivotal"]["enabled"]:
        return
    tokens = "".join(pivotal_tokens(p))
    if not any(tokens in r["caption"] for r in records):
        raise TrainingError(f"train.pivotal.enabled but no caption contains the pivotal tokens {tokens} (first: "
                            f"{records[0]['caption']!r}): build captions with captions.effective_params(params)")


# --------------------------------------------------------------------------- setup


def add_pivotal_tokens(parts: Parts, p: dict) -> list[list[int]]:
    """Add <s0>…<sN> to every tokenizer, initialised from the class noun's embedding.
    Returns the new ids per text encoder."""
    tokens = pivotal_tokens(p)
    out = []
    for tok, te in zip(parts.tokenizers, parts.text_encoders):
        init_ids = tok(p["captions"]["class_noun"], add_special_tokens=False).input_ids
        init = te.get_input_embeddings().weight.data[init_ids].mean(0)
        tok.add_tokens(tokens)
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        ids = tok.convert_tokens_to_ids(tokens)
        with torch.no_grad():
            te.get_input_embeddings().weight[ids] = init
        out.append(ids)
    return out


def apply_method(parts: Parts, p: dict) -> None:
    """Mark what trains (the method's adapters or weights; dbkit/methods/), then gradient
    checkpointing."""
    from . import methods

    t = p["train"]
    for m in (parts.vae, parts.unet, *parts.text_encoders):
        m.requires_grad_(False)
    try:
        methods.get(t["method"]).apply(parts, p)
    except methods.ParamsProblem as e:  # what only the live modules show (DoRA on a convolution)
        raise TrainingError(str(e)) from e
    if t["gradient_checkpointing"]:
        parts.unet.enable_gradient_checkpointing()
        if t["text_encoder"]:
            for te in parts.text_encoders:
                te.gradient_checkpointing_enable()


def make_optimizer(groups: list[dict], t: dict) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if t["optimizer"] == "adamw":
        # foreach: on CPU torch defaults to a Python loop over the parameters (hundreds of LoRA
        # tensors); the _foreach_ kernels give the same numbers bit for bit (tests) in fewer calls
        return torch.optim.AdamW(groups, weight_decay=t["weight_decay"], foreach=True)
    if t["optimizer"] == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise TrainingError("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes; "
                                "it needs a CUDA GPU); or use adamw") from e
        return bnb.optim.AdamW8bit(groups, weight_decay=t["weight_decay"])
    if t["optimizer"] == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, weight_decay=t["weight_decay"], safeguard_warmup=True, use_bias_correction=True)
    raise TrainingError(f"unknown train.optimizer {t['optimizer']!r}")


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Example:
    pixels: torch.Tensor  # [3, H, W] in [-1, 1]
    record: dict  # caption record {file, caption, tags} (class images: fixed class prompt)
    latent: torch.Tensor | None = None  # cached latent_dist parameters [2C, h, w]
    bucket: tuple[int, int] | None = None  # (width, height) with aspect-ratio buckets
    # SDXL's size/crop conditioning (diffusers' train_dreambooth_lora_sdxl.py convention):
    # the photo's (height, width) before any resize, and the (top, left) of the crop taken
    # from the resized photo; see size_ids
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    # train.masked_loss: the subject's weight per pixel [1, H, W] in [0, 1], cropped, resized
    # and flipped with `pixels`; None = every pixel counts (class images, masked_loss off)
    mask: torch.Tensor | None = None


def load_examples(records: list[dict], p: dict, *, masks: bool = False) -> list[Example]:
    """Images at training size. Square crops by default; with random crops (data.center_crop
    false) the short side is scaled to the resolution and the crop is taken at each step;
    with data.buckets each image keeps its aspect ratio in the nearest bucket. `masks`: each
    image's subject mask (dbkit.masks; a missing one is a DataError naming the photo) goes
    through the same resize, crop and flip as its pixels, by the same code."""
    d = p["data"]
    res = d["resolution"]
    out = []
    for r in records:
        im = data.open_rgb(Path(r["file"]))
        mask = mk.require_mask(Path(r["file"]), toy=mk.is_toy(p)) if masks else None
        bucket = data.bucket_for(*im.size, res, step=64 if res >= 256 else 8) if d["buckets"] else None
        size = bucket or (res, res)
        crop_now = bucket is not None or d["center_crop"]  # else `random_crop` takes it at each step
        pixels, left, top, width = fit_picture(im, size, crop_now)
        ex = Example(data.to_tensor(pixels), r, bucket=bucket, original_size=(im.height, im.width),
                     crop_top_left=(top, left),
                     mask=None if mask is None else mask_tensor(fit_picture(mask, size, crop_now)[0]))
        out.append(ex)
        if d["flip"]:  # in the mirrored photo the crop starts where the original's ended
            mirrored = (top, width - left - pixels.width)
            out.append(dataclasses.replace(ex, pixels=torch.flip(ex.pixels, dims=[2]), crop_top_left=mirrored,
                                           mask=None if ex.mask is None else torch.flip(ex.mask, dims=[2])))
    return out * d["repeats"]


def fit_picture(picture, size: tuple[int, int], crop_now: bool):
    """A photo (or its mask: the same code, so the same pixels) scaled to cover `size` and,
    when `crop_now`, centre-cropped to it. Returns (picture, left, top, scaled width)."""
    scaled = data.scale_to_cover(picture, size)
    left, top = data.center_offset(scaled.size, size) if crop_now else (0, 0)
    kept = scaled.crop((left, top, left + size[0], top + size[1])) if crop_now else scaled
    return kept, left, top, scaled.width


def mask_tensor(mask) -> torch.Tensor:
    """An L-mode mask image → [1, H, W] float weights in [0, 1] (white = 1)."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def batch_indices(examples: list[Example], step: int, batch: int, seed: int, salt: int) -> list[int]:
    """The step's instance indices; with buckets the batch is filled from the bucket of the
    image the epoch order puts first (a batch must share one shape)."""
    idx = epoch_indices(len(examples), step, batch, seed, salt)
    bucket = examples[idx[0]].bucket
    if bucket is None:
        return idx
    same = [i for i, e in enumerate(examples) if e.bucket == bucket]
    g = torch.Generator().manual_seed(seed * 7919 + step * 13 + salt + 1)
    return [idx[0]] + [same[int(j)] for j in torch.randint(0, len(same), (batch - 1,), generator=g)]


def fit_to(ex: Example, bucket: tuple[int, int] | None) -> Example:
    """A class image reshaped to the instance batch's bucket (encoded at the step, uncached).
    Class images have no mask (prior preservation keeps the whole picture), so none is carried."""
    if ex.mask is not None:
        raise TrainingError(f"{ex.record.get('file')}: fit_to reshapes class images, which have no mask")
    if bucket is None or tuple(ex.pixels.shape[1:][::-1]) == bucket:
        return ex
    im = data.to_image(ex.pixels)
    scaled = data.scale_to_cover(im, bucket)
    left, top = data.center_offset(scaled.size, bucket)
    # crop, resize, crop again = one crop of the photo resized by both factors
    s = scaled.width / im.width
    top0, left0 = ex.crop_top_left
    return Example(data.to_tensor(scaled.crop((left, top, left + bucket[0], top + bucket[1]))), ex.record,
                   bucket=bucket, original_size=ex.original_size,
                   crop_top_left=(round(top0 * s) + top, round(left0 * s) + left))


def crop(pixels: torch.Tensor, res: int, gen: torch.Generator) -> torch.Tensor:
    return random_crop(Example(pixels, {}), res, gen).pixels


def random_crop(ex: Example, res: int, gen: torch.Generator) -> Example:
    """A res×res crop of the example at a place drawn from the step's generator (y, then x);
    the offset adds to the example's own for the size/crop conditioning."""
    _, h, w = ex.pixels.shape
    y = int(torch.randint(0, h - res + 1, (1,), generator=gen))
    x = int(torch.randint(0, w - res + 1, (1,), generator=gen))
    top, left = ex.crop_top_left
    mask = None if ex.mask is None else ex.mask[:, y : y + res, x : x + res]  # the same window
    return dataclasses.replace(ex, pixels=ex.pixels[:, y : y + res, x : x + res], crop_top_left=(top + y, left + x),
                               mask=mask)


@torch.no_grad()
def cache_latents(vae, examples: list[Example], batch: int = 64) -> None:
    """Encode every example once; the loop samples from the cached distribution each step
    (mean + σ·ε with that step's generator), which is what encoding every step would give."""
    by_shape: dict[tuple, list[Example]] = {}
    for e in examples:
        by_shape.setdefault(tuple(e.pixels.shape), []).append(e)  # buckets: one shape per stack
    for group in by_shape.values():
        for k in range(0, len(group), batch):
            chunk = group[k : k + batch]
            params = vae.encode(torch.stack([e.pixels for e in chunk]).to(vae.device, vae.dtype)).latent_dist.parameters
            for e, lat in zip(chunk, params):
                e.latent = lat.float().cpu()


def sample_latents(vae, batch: list[Example], gen: torch.Generator, res: int) -> torch.Tensor:
    """The step's latents. Random crops are taken here, and each cropped example replaces its
    entry in `batch` (the step's own list), so encode_text(examples=batch) sees its offset."""
    todo = [k for k, e in enumerate(batch) if e.latent is None]
    fresh = {}
    if todo:  # not cached: random crops, or class images fitted to a bucket
        for k in todo:
            if not batch[k].bucket:
                batch[k] = random_crop(batch[k], res, gen)
        pixels = torch.stack([batch[k].pixels for k in todo])
        with torch.no_grad():
            enc = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters.float().cpu()
        fresh = dict(zip(todo, enc))
    params = torch.stack([fresh[k] if k in fresh else e.latent for k, e in enumerate(batch)])
    mean, logvar = params.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30, 20))
    z = mean + std * torch.randn(mean.shape, generator=gen)
    return normalise_latents(vae, z)


def normalise_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents → the UNet's scale (Playground v2.5's VAE also has per-channel mean/std)."""
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1)
        return (z - mean) * cfg.scaling_factor / std
    return z * cfg.scaling_factor


def epoch_indices(n: int, step: int, batch: int, seed: int, salt: int) -> list[int]:
    """Indices for one step, walking seeded per-epoch permutations (resume-safe)."""
    out, perms = [], {}
    for k in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(k, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch * 31 + salt))
        out.append(int(perms[epoch][pos]))
    return out


# --------------------------------------------------------------------------- checkpoints


def trainable_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().cpu().clone() for name, m in modules.items()
            for k, v in m.named_parameters() if v.requires_grad}


def save_checkpoint(ckpt_root: Path, step: int, modules: dict, optimizer, lr_sched, ema, keep: int,
                    grad_accum: int = 1) -> Path:
    """Write checkpoint-<step>/ atomically (temp folder + rename), then apply retention. The
    loop calls it between optimizer updates only: no gradient is half accumulated, so the
    weights, optimizer, schedule and EMA are the whole state."""
    final = ckpt_root / f"checkpoint-{step:06d}"
    tmp = ckpt_root / f".tmp-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {"step": step, "params": all_params_state(modules), "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_sched.state_dict(), "ema": ema.state_dict() if ema else None,
             "grad_accum": grad_accum}  # `step` counts updates of this many micro-batches
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    ckpts = sorted(ckpt_root.glob("checkpoint-*"))
    for old in ckpts[: max(0, len(ckpts) - keep)]:
        shutil.rmtree(old)
    return final


def all_params_state(modules: dict) -> dict[str, torch.Tensor]:
    """Trainable parameters plus each text encoder's (possibly grown) token embedding."""
    state = trainable_state(modules)
    for name, m in modules.items():
        if name.startswith("text_encoder"):
            state[f"{name}.__embeddings__"] = m.get_input_embeddings().weight.detach().cpu().clone()
    return state


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest checkpoint a resume can load (a damaged state.pt is passed over)."""
    ckpts = intact_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def load_weights(saved: dict[str, torch.Tensor], modules: dict) -> None:
    """Copy a checkpoint's trainable parameters and token embeddings into the modules."""
    params = dict(saved)
    with torch.no_grad():
        for name, m in modules.items():
            if f"{name}.__embeddings__" in params:
                m.get_input_embeddings().weight.copy_(params.pop(f"{name}.__embeddings__"))
        for name, m in modules.items():
            for k, v in m.named_parameters():
                key = f"{name}.{k}"
                if key in params:
                    v.copy_(params[key])


def export_checkpoint(ckpt: Path, p: dict, base_path: Path, family: str, caption_records: list[dict]) -> Path:
    """A checkpoint written as an output folder (``checkpoint-N/output``, made once: a checkpoint
    folder never changes after its rename), so a checkpoint is sampled through the same files
    and public loaders as the final model. These are the raw weights: EMA, if on, is not in them."""
    out = ckpt / "output"
    if (out / "training_metadata.json").exists():
        return out
    p = effective_params(p)
    torch.manual_seed(p["seed"])  # the LoRA layers' initialisation is overwritten below; seeded anyway
    parts = load_parts(base_path, family, p)
    new_ids = add_pivotal_tokens(parts, p) if p["train"]["pivotal"]["enabled"] else []
    apply_method(parts, p)
    modules = {"unet": parts.unet, **dict(zip(parts.te_names, parts.text_encoders))}
    load_weights(torch.load(ckpt / "state.pt", weights_only=False)["params"], modules)
    save_output(out, parts, modules, p, family, base_path, caption_records, new_ids)
    return out


def readable_checkpoint(ckpt_root: Path, *, warn: bool = True) -> tuple[Path, dict] | None:
    """The newest checkpoint whose state.pt loads, and that state. A damaged one (cut short by a
    full disk or a partial copy: the atomic rename guards only dbkit's own writes) is passed
    over with one warning naming it, so a resume falls back instead of failing every time."""
    damaged = []
    for ckpt in sorted(ckpt_root.glob("checkpoint-*"), reverse=True):
        try:
            state = torch.load(ckpt / "state.pt", weights_only=False)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
            damaged.append(f"{ckpt / 'state.pt'} ({_load_error(e)})")
            continue
        if damaged and warn:
            print(f"warning: {'; '.join(damaged)}: damaged checkpoint, not loadable; resumed from {ckpt.name} "
                  "instead", file=sys.stderr)
        return ckpt, state
    if damaged and warn:
        print(f"warning: {'; '.join(damaged)}: damaged checkpoint, not loadable, and no other checkpoint is left: "
              "training starts again from step 0", file=sys.stderr)
    return None


def _load_error(e: Exception) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e).split(". ")[0][:120] or type(e).__name__  # torch's zip errors run on for lines


def load_checkpoint(path: Path, state: dict, modules: dict, optimizer, lr_sched, ema, grad_accum: int = 1) -> int:
    """Copy the state read from checkpoint `path` into the modules, optimizer, schedule and EMA;
    returns its step."""
    if state.get("grad_accum", 1) != grad_accum:  # older dbkit counted micro-batches as steps
        raise TrainingError(f"{path} counts steps of {state.get('grad_accum', 1)} micro-batch(es), this run of "
                            f"train.grad_accum={grad_accum}: delete {path.parent} to train afresh")
    load_weights(state["params"], modules)
    optimizer.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_scheduler"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    return int(state["step"])


# --------------------------------------------------------------------------- the loop


def encode_text(parts: Parts, prompts: list[str], memo: dict | None, res: int, *,
                examples: list[Example] | None = None) -> tuple[torch.Tensor, dict | None]:
    """Text conditioning for the UNet: hidden states (and for SDXL-style bases the pooled
    embedding and size/crop ids, per sample from `examples`, the step's batch after
    sample_latents; without them every sample claims a whole res×res photo). `memo`
    (caption → embeddings) is used only while every text encoder is frozen, so it stays
    correct under caption shuffling and dropout."""
    if memo is not None and all(pr in memo for pr in prompts):
        rows = [memo[pr] for pr in prompts]
    else:
        hidden, pooled = [], None
        for tok, te in zip(parts.tokenizers, parts.text_encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(te.device)
            if len(parts.text_encoders) == 1:
                hidden.append(te(ids)[0])
            else:  # SDXL conditions on the penultimate layer of both encoders, pooled from the second
                out = te(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]
        ehs = torch.cat(hidden, dim=-1)
        rows = [(e, None if pooled is None else pl) for e, pl in zip(ehs, pooled if pooled is not None else ehs)]
        if memo is not None:
            for pr, (e, pl) in zip(prompts, rows):
                memo[pr] = (e.detach(), None if pl is None else pl.detach())
    ehs = torch.stack([e for e, _ in rows])
    if rows[0][1] is None:
        return ehs, None
    ids = [size_ids(e, res) for e in examples] if examples is not None else [[res, res, 0, 0, res, res]] * len(rows)
    time_ids = torch.tensor(ids, dtype=ehs.dtype, device=ehs.device)
    return ehs, {"text_embeds": torch.stack([pl for _, pl in rows]), "time_ids": time_ids}


def size_ids(ex: Example, res: int) -> list[int]:
    """SDXL's micro-conditioning of one sample, as diffusers' SDXL scripts and pipeline order
    it: original (height, width), crop (top, left), target (height, width) = the training
    size (its bucket). The model learns what a crop or an upscaled small photo looks like,
    and at inference (crop 0, original = target) draws uncropped, full-resolution images."""
    target = (ex.bucket[1], ex.bucket[0]) if ex.bucket else (res, res)
    return [*(ex.original_size or target), *ex.crop_top_left, *target]


def step_generators(seed: int, step: int, rank: int) -> tuple[torch.Generator, random.Random]:
    s = (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63)
    return torch.Generator().manual_seed(s), random.Random(s)


# --------------------------------------------------------------------------- the loop's setup


@dataclasses.dataclass
class Trainer:
    """What the training step reads, built once by `setup_training`. What changes from step
    to step lives in the modules, the optimizer, the LR schedule and the EMA (all checkpointed)
    and in `memo`, a cache that never changes a result."""

    p: dict  # effective params
    accel: object
    parts: Parts  # parts.text_encoders: the encoders as the step calls them (DDP-wrapped when they train)
    unet: torch.nn.Module  # the UNet as the step calls it (DDP-wrapped when it trains)
    trained: list[torch.nn.Module]  # the prepared modules that train: what `accel.accumulate` keeps from syncing
    modules: dict[str, torch.nn.Module]  # unwrapped, by name: what checkpoints, previews and the output read
    optimizer: object
    lr_sched: object
    ema: object  # EMAModel or None
    trainable: list[torch.Tensor]
    te_params: list[torch.Tensor]
    embs: list  # each text encoder's token embedding (pivotal tuning trains new rows of it)
    orig_embs: list[torch.Tensor]
    new_ids: list[list[int]]
    instance: list[Example]
    klass: list[Example]
    prior_prompt: str
    run_dir: Path
    trackers: str | None
    memo: dict | None = None  # caption → text embeddings, once the text side is frozen

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "train_log.jsonl"


def setup_training(p: dict, run_dir: Path, caption_records: list[dict], base_path: Path, family: str,
                   class_dir: Path | None) -> Trainer:
    """Everything before the first step. The order is part of the run: LoRA's initialisation
    draws from the global RNG seeded here."""
    from diffusers.training_utils import EMAModel

    t = p["train"]
    accel, trackers = make_accelerator(p, run_dir, family)
    torch.manual_seed(p["seed"])
    parts = load_parts(base_path, family, p)
    new_ids = add_pivotal_tokens(parts, p) if t["pivotal"]["enabled"] else []
    apply_method(parts, p)
    cast_frozen_weights(parts, t, accel.mixed_precision)
    embs = [te.get_input_embeddings() for te in parts.text_encoders]
    if new_ids:
        for e in embs:
            e.weight.requires_grad_(True)
    orig_embs = [e.weight.detach().clone() for e in embs]
    parts.vae.to(accel.device)
    instance, klass, prior_prompt = load_training_examples(p, parts.vae, caption_records, class_dir)
    groups = param_groups(parts, embs, new_ids, t)
    optimizer = make_optimizer(groups, t)
    lr_sched = make_lr_schedule(optimizer, t)
    trainable = [q for g in groups for q in g["params"]]
    ema = EMAModel(trainable, decay=t["ema_decay"]) if t["ema_decay"] > 0 else None
    unet, trained = prepare_modules(accel, parts)
    modules = {"unet": accel.unwrap_model(unet)}
    modules.update({name: accel.unwrap_model(te) for name, te in zip(parts.te_names, parts.text_encoders)})
    te_params = groups[1]["params"]
    return Trainer(p=p, accel=accel, parts=parts, unet=unet, trained=trained, modules=modules,
                   optimizer=accel.prepare(optimizer), lr_sched=lr_sched, ema=ema, trainable=trainable,
                   te_params=te_params, embs=embs, orig_embs=orig_embs, new_ids=new_ids, instance=instance,
                   klass=klass, prior_prompt=prior_prompt, run_dir=run_dir, trackers=trackers,
                   memo={} if not te_params and not new_ids else None)


def make_accelerator(p: dict, run_dir: Path, family: str):
    """The Accelerator and the tracker name (None: train_log.jsonl only)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    t = p["train"]
    trackers = None if t["log_with"] == "none" else t["log_with"]
    reset_accelerate_state()
    # SDXL-style bases condition on the first text encoder's penultimate layer, so its last
    # layer gets no gradient; DDP must be told, or the next step fails waiting for it
    unused = family in XL_FAMILIES and t["text_encoder"]
    accel = Accelerator(mixed_precision=t["mixed_precision"], gradient_accumulation_steps=t["grad_accum"],
                        log_with=trackers, project_dir=str(run_dir / "logs"),
                        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)])
    if trackers:
        accel.init_trackers(p["experiment"] or "dbkit", config={"params_hash": run_dir.name})
    return accel, trackers


def load_training_examples(p: dict, vae, caption_records: list[dict],
                           class_dir: Path | None) -> tuple[list[Example], list[Example], str]:
    """Instance examples, class (prior) examples and the class prompt, latents cached where
    the pixels are the same at every step."""
    instance = load_examples(caption_records, p, masks=p["train"]["masked_loss"])
    per_image = p["prior"]["class_prompt"] == cap.CAPTION_CLASS_PROMPT
    prior_prompt = "" if per_image else cap.expand(p["prior"]["class_prompt"], p)
    klass: list[Example] = []
    if p["prior"]["enabled"]:
        if class_dir is None:
            raise TrainingError("prior.enabled but no class images were prepared (run 01_data first)")
        recs = [{"file": str(f), "caption": prior_prompt, "tags": [prior_prompt]} for f in data.list_images(class_dir)]
        if per_image:  # each class image's own prompt, as its folder's metadata.jsonl records it
            said = {name: rec.get("text") or rec.get("caption") for name, rec in data.read_metadata(class_dir).items()}
            missing = [Path(r["file"]).name for r in recs if not said.get(Path(r["file"]).name)]
            if missing:
                raise TrainingError(f"{class_dir}: prior.class_prompt is \"{{caption}}\" but metadata.jsonl gives no "
                                    f"text for {', '.join(missing[:5])}; add a text per class image or set a "
                                    "fixed prior.class_prompt")
            recs = [r | {"caption": said[Path(r["file"]).name], "tags": [said[Path(r["file"]).name]]} for r in recs]
        klass = load_examples(recs, {**p, "data": {**p["data"], "flip": False, "repeats": 1, "center_crop": True}})
    if p["train"]["cache_latents"] and p["data"]["center_crop"]:  # random crops differ every step: nothing to cache
        cache_latents(vae, instance + klass)
    return instance, klass, prior_prompt


def param_groups(parts: Parts, embs: list, new_ids: list[list[int]], t: dict) -> list[dict]:
    """UNet, text encoders, pivotal embeddings: in this order, each at its own lr (groups may
    be empty; the optimizer drops those)."""
    te_params = [q for te in parts.text_encoders for n, q in te.named_parameters()
                 if q.requires_grad and "token_embedding" not in n]
    return [
        {"params": [q for q in parts.unet.parameters() if q.requires_grad], "lr": t["lr"], "name": "unet"},
        {"params": te_params, "lr": t["text_encoder_lr"], "name": "text_encoder"},
        {"params": [e.weight for e in embs] if new_ids else [], "lr": t["pivotal"]["lr"], "name": "embeddings",
         "weight_decay": 0.0},
    ]


def make_lr_schedule(optimizer, t: dict):
    """The LR schedule in optimizer updates (train.steps, train.warmup_steps), advanced by the
    loop once per update. It is not passed through `accel.prepare`: accelerate's wrapper steps
    the schedule num_processes times per update (it assumes a schedule sized for every
    process's batches) and counts on its own when to skip; stepping it here keeps one rule for
    one process, several processes and gradient accumulation."""
    from diffusers.optimization import get_scheduler

    name = t["lr_scheduler"]
    if name == "constant" and t["warmup_steps"]:
        name = "constant_with_warmup"  # diffusers' "constant" ignores num_warmup_steps
    return get_scheduler(name, optimizer, num_warmup_steps=t["warmup_steps"], num_training_steps=t["steps"])


def prepare_modules(accel, parts: Parts) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """Only modules with something to train go through `accel.prepare`: DDP refuses a module
    without a trainable parameter (UNet-only, text-encoder-only, full fine-tuning of one part)
    and a frozen module has no gradient to synchronise. A frozen one gets the same device
    placement and autocast from `prepare_model(evaluation_mode=True)`, which never wraps it.
    Returns the UNet as the step calls it and the trained modules; the text encoders as the step
    calls them replace parts.text_encoders."""
    trained = []

    def prepare(m: torch.nn.Module) -> torch.nn.Module:
        if not any(q.requires_grad for q in m.parameters()):
            return accel.prepare_model(m, evaluation_mode=True)
        # from_pretrained leaves models in eval mode and peft adds its LoRA dropout in train
        # mode: without this, LoRA dropout ran until the first preview, whose return to the
        # module's (eval) mode switched it off for the rest of the run
        m.train()
        m = accel.prepare(m)
        trained.append(m)
        return m

    unet = prepare(parts.unet)
    parts.text_encoders = [prepare(te) for te in parts.text_encoders]
    return unet, trained


def resume(tr: Trainer) -> int:
    """The step to start from: the latest readable checkpoint's, or 0. The log loses what an
    interrupted run wrote past that checkpoint."""
    start = 0
    found = readable_checkpoint(tr.ckpt_root, warn=tr.accel.is_main_process)
    if found is not None:
        start = load_checkpoint(*found, tr.modules, tr.optimizer, tr.lr_sched, tr.ema,
                                grad_accum=tr.p["train"]["grad_accum"])
    if tr.log_path.exists():
        # a torn last line (killed mid-write) is dropped here with a warning, not appended to
        kept = [rec for rec in read_train_log(tr.log_path) if rec.get("step", 0) <= start]
        atomic_write_text(tr.log_path, "".join(json.dumps(rec) + "\n" for rec in kept))
    return start


def read_train_log(path: Path) -> list[dict]:
    """train_log.jsonl's records; a line that does not parse is skipped with a warning naming
    the file (json.dumps of a parsed record gives back the line it was written as)."""
    from .runs import read_log

    return read_log(path)


# --------------------------------------------------------------------------- the loop's step


def optimizer_step(tr: Trainer, step: int) -> dict:
    """Step `step`: one optimizer update from train.grad_accum micro-batches. Micro-batch k is
    micro-step step·grad_accum + k, the key of its data, noise and dropout, so they do not
    depend on where a run was resumed. Returns the step's log record."""
    t, accel, n = tr.p["train"], tr.accel, tr.p["train"]["grad_accum"]
    te_on = step < math.ceil(t["text_encoder_fraction"] * t["steps"]) and bool(tr.te_params)
    ti_on = step < math.ceil(t["pivotal"]["ti_fraction"] * t["steps"]) and bool(tr.new_ids)
    if tr.memo is None and not te_on and not ti_on:
        tr.memo = {}  # text side frozen from here on: embeddings can be memoised
    losses = []
    for k in range(n):
        # accelerate counts micro-batches itself and syncs gradients (DDP) on every n-th;
        # every step starts at a multiple of n (checkpoints fall between steps), so its
        # count and this loop's agree
        with oom_advice(t, step), accel.accumulate(*tr.trained):
            losses.append(micro_step(tr, step, step * n + k, te_on, ti_on))
    if not accel.sync_gradients:
        raise RuntimeError(f"accelerate's accumulation count is out of step with the loop at step {step}")
    with oom_advice(t, step):
        update(tr)
    loss, inst, prior = (sum(x) / n for x in zip(*losses))
    # lr: the rate after this update (the next one's), as the diffusers scripts log it; a
    # linear schedule reads 0 at its last step
    return {"step": step + 1, "loss": loss, "loss_instance": inst, "loss_prior": prior,
            "lr": tr.optimizer.param_groups[0]["lr"]}


def micro_step(tr: Trainer, step: int, micro: int, te_on: bool, ti_on: bool) -> tuple[float, float, float]:
    """Forward and backward of one micro-batch; returns its (loss, instance, prior) losses."""
    p, t, accel = tr.p, tr.p["train"], tr.accel
    gen, rng = step_generators(p["seed"], micro, accel.process_index)
    torch.manual_seed(gen.initial_seed())  # LoRA dropout draws from the global RNG
    idx = batch_indices(tr.instance, micro, t["batch_size"], p["seed"], accel.process_index)
    batch = [tr.instance[i] for i in idx]
    prompts = [cap.train_caption(e.record, p, rng) for e in batch]
    if tr.klass:
        cidx = epoch_indices(len(tr.klass), micro, t["batch_size"], p["seed"] + 1, accel.process_index)
        batch += [fit_to(tr.klass[i], batch[0].bucket) for i in cidx]
        prompts += [tr.klass[i].record["caption"] for i in cidx]
    loss, l_inst, l_prior = batch_loss(tr, batch, prompts, len(idx), gen, te_on or ti_on)
    if not torch.isfinite(loss):
        raise TrainingError(nan_message(t, step, loss.item(), latest_checkpoint(tr.ckpt_root)))
    accel.backward(loss)  # divided by train.grad_accum: the update follows the mean over micro-batches
    if not te_on:
        for q in tr.te_params:
            q.grad = None
    if not ti_on and tr.new_ids:
        for e in tr.embs:
            e.weight.grad = None
    return loss.item(), l_inst.item(), l_prior.item()


def nan_message(t: dict, step: int, loss: float, kept: Path | None) -> str:
    """A non-finite loss: the knobs these params have not turned yet (advising clipping that is
    already on sends the user in a circle), and where the last checkpoint is, if any."""
    fixes = [f"lower train.lr (now {t['lr']})"]
    if t["max_grad_norm"] <= 0:
        fixes.append("set train.max_grad_norm: 1.0")
    if t["mixed_precision"] != "no":
        fixes.append(f"set train.mixed_precision: no (now {t['mixed_precision']})")
    where = (f"last good checkpoint: {kept}" if kept is not None else
             f"no checkpoint was saved before it (train.save_every {t['save_every']})")
    return f"loss became {loss} at step {step + 1}: {' or '.join(fixes)}; {where}"  # step as the log counts


def batch_loss(tr: Trainer, batch: list[Example], prompts: list[str], n_instance: int, gen: torch.Generator,
               text_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DreamBooth loss of one batch (instance images first, then class images)."""
    p, t, parts, dev = tr.p, tr.p["train"], tr.parts, tr.accel.device
    sched, res = parts.noise_scheduler, p["data"]["resolution"]
    latents = sample_latents(parts.vae, batch, gen, res).to(dev)
    noise = torch.randn(latents.shape, generator=gen)
    if t["noise_offset"]:
        noise += t["noise_offset"] * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=gen)
    noise = noise.to(dev)
    noised = diffusion.noise_latents(sched, latents, noise, gen, parts.objective)
    with torch.set_grad_enabled(text_grad):
        ehs, added = encode_text(parts, prompts, None if text_grad else tr.memo, res, examples=batch)
    with tr.accel.autocast():
        pred = tr.unet(noised.model_input, noised.timesteps, ehs, added_cond_kwargs=added).sample
    mask = batch_mask(batch, latents.shape[-2:]) if t["masked_loss"] else None
    per = diffusion.per_sample_loss(sched, pred, latents, noise, noised, parts.objective,
                                    None if mask is None else mask.to(dev))
    w = diffusion.snr_weights(sched, noised.timesteps.cpu(), t["min_snr_gamma"], parts.objective)
    return diffusion.dreambooth_loss(per, w, n_instance, p["prior"]["weight"])


def batch_mask(batch: list[Example], size: tuple[int, int]) -> torch.Tensor:
    """The step's masks at the latents' (h, w); an example without one (a class image:
    the prior loss stays unmasked) counts everywhere."""
    pixel = [e.mask if e.mask is not None else torch.ones(1, *e.pixels.shape[1:]) for e in batch]
    return diffusion.latent_mask(torch.stack(pixel), tuple(size))


def update(tr: Trainer) -> None:
    """The optimizer update that closes an accumulation; the LR schedule and the EMA advance
    with it, once per update."""
    t, accel = tr.p["train"], tr.accel
    if t["max_grad_norm"] > 0:
        accel.clip_grad_norm_([q for q in tr.trainable if q.grad is not None], t["max_grad_norm"])
    tr.optimizer.step()
    if not accel.optimizer_step_was_skipped:  # fp16 overflow skipped the update: the schedule waits for it
        tr.lr_sched.step()
    tr.optimizer.zero_grad(set_to_none=True)
    if tr.new_ids:
        restore_vocabulary(tr.embs, tr.orig_embs, tr.new_ids)
    if tr.ema is not None:
        tr.ema.step(tr.trainable)


def record_step(tr: Trainer, rec: dict, log, bar) -> None:
    """A step's record to the trackers, train_log.jsonl, the caller's `log` and the bar."""
    if tr.trackers:
        tr.accel.log(rec, step=rec["step"])
    if tr.accel.is_main_process:
        with open(tr.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if log:
            log(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}")


def train(p: dict, run_dir: Path, caption_records: list[dict], *, base_path: Path, family: str,
          class_dir: Path | None = None, log=None, progress: bool = True, max_steps: int | None = None,
          preview=None) -> Path:
    """Train and write the result to run_dir/output; resumes from run_dir/checkpoints.

    A step is one optimizer update, made of train.grad_accum micro-batches of train.batch_size
    (as --max_train_steps counts in the diffusers and kohya scripts): train.steps, warmup_steps,
    save_every, sample_every, the text-encoder and pivotal fractions, `max_steps` and the log
    all count updates. Checkpoints fall between updates, so a resumed run never starts inside
    an accumulation.

    `max_steps` stops early (used by the kill-and-resume test to simulate an interruption);
    `preview(step, pipe)` is called at `train.sample_every` with an inference pipeline.
    """
    from tqdm.auto import tqdm

    check_combination(p, family)
    run_dir.mkdir(parents=True, exist_ok=True)
    p = effective_params(p)
    check_pivotal_captions(caption_records, p)
    tr = setup_training(p, run_dir, caption_records, base_path, family, class_dir)
    t, accel, parts, modules, ema = p["train"], tr.accel, tr.parts, tr.modules, tr.ema
    start = resume(tr)
    end = t["steps"] if max_steps is None else min(t["steps"], max_steps)
    bar = tqdm(range(start, end), initial=start, total=t["steps"], desc="train", disable=not progress)
    t0 = time.time()
    for step in bar:
        rec = optimizer_step(tr, step) | {"elapsed_s": round(time.time() - t0, 2)}
        record_step(tr, rec, log, bar)
        done = step + 1
        if accel.is_main_process and t["save_every"] and done % t["save_every"] == 0 and done < t["steps"]:
            save_checkpoint(tr.ckpt_root, done, modules, tr.optimizer, tr.lr_sched, ema, t["keep_checkpoints"],
                            grad_accum=t["grad_accum"])
        if accel.is_main_process and preview and preview_due(t, done) and not (ema and done == t["steps"]):
            draw_preview(preview, done, parts, modules, base_path, p)
    if tr.trackers:
        accel.end_training()
    if end < t["steps"]:
        return run_dir  # stopped early on purpose (max_steps)
    accel.wait_for_everyone()
    if ema is not None:
        ema.copy_to(tr.trainable)
        if accel.is_main_process and preview and preview_due(t, t["steps"]):  # the weights that are saved
            draw_preview(preview, t["steps"], parts, modules, base_path, p)
    out = run_dir / "output"
    if accel.is_main_process:
        save_output(out, parts, modules, p, family, base_path, caption_records, tr.new_ids)
    return out


def preview_due(t: dict, done: int) -> bool:
    """Previews every train.sample_every steps, and always at the last step: the final
    preview is the trained model's picture, the one the evaluation must reproduce."""
    return bool(t["sample_every"]) and (done % t["sample_every"] == 0 or done == t["steps"])


def draw_preview(preview, step: int, parts: Parts, modules: dict, base_path: Path, p: dict) -> None:
    with sampling_mode(modules, p["sample"]["lora_scale"]):
        preview(step, inference_pipeline(parts, modules, base_path))


@contextlib.contextmanager
def sampling_mode(modules: dict, lora_scale: float):
    """The live modules as evaluation loads them: eval mode (no LoRA dropout) and LoRA at
    sample.lora_scale; training mode and scale are restored afterwards."""
    from diffusers.utils import scale_lora_layers, unscale_lora_layers

    was = {name: m.training for name, m in modules.items()}
    for m in modules.values():
        m.eval()
        scale_lora_layers(m, lora_scale)
    try:
        yield
    finally:
        for name, m in modules.items():
            unscale_lora_layers(m, lora_scale)
            m.train(was[name])


def reset_accelerate_state() -> None:
    """accelerate keeps its state in a process-wide singleton that refuses a second, different
    mixed_precision; ablation variants train one after another in one kernel, so start afresh
    (single-process only: under `accelerate launch` the launcher's state must stay)."""
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and PartialState().num_processes > 1:
        return
    AcceleratorState._reset_state(reset_partial_state=True)


@contextlib.contextmanager
def oom_advice(t: dict, step: int):
    """Turn an out-of-memory error into the knobs that fix it."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingError(
            f"out of GPU memory at step {step}: lower train.batch_size (now {t['batch_size']}) and raise "
            f"train.grad_accum, set train.gradient_checkpointing: true (now {t['gradient_checkpointing']}), "
            f"train.mixed_precision: bf16 (now {t['mixed_precision']}), train.cache_latents: true, "
            "or lower data.resolution; LoRA (train.method: lora) needs far less than full") from e


def cast_frozen_weights(parts: Parts, t: dict, precision: str) -> None:
    """With bf16/fp16, keep frozen weights in half precision (memory) and every trainable
    weight in fp32 (optimizer precision), as the diffusers scripts do."""
    if precision == "no":
        return
    from diffusers.training_utils import cast_training_params

    from . import methods

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    parts.vae.to(dtype=dtype)
    for m in (parts.unet, *parts.text_encoders):
        if methods.get(t["method"]).adapter or not any(q.requires_grad for q in m.parameters()):
            m.to(dtype=dtype)
            cast_training_params(m, dtype=torch.float32)


def restore_vocabulary(embs: list, originals: list[torch.Tensor], new_ids: list[list[int]]) -> None:
    """Pivotal tuning moves only the new tokens' rows; put every other row back."""
    with torch.no_grad():
        for e, orig, ids in zip(embs, originals, new_ids):
            keep = torch.ones(e.weight.shape[0], dtype=torch.bool)
            keep[ids] = False
            e.weight[keep] = orig[keep].to(e.weight.dtype)


def inference_pipeline(parts: Parts, modules: dict, base_path: Path):
    """A diffusers pipeline around the live (training) modules, for previews and saving."""
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sched_cfg = diffusers.DDIMScheduler.load_config(base_path / "scheduler")
    cls = getattr(diffusers, sched_cfg["_class_name"], diffusers.DDIMScheduler)
    scheduler = cls.from_config(sched_cfg)
    if parts.objective != "edm" and parts.objective != sched_cfg.get("prediction_type", "epsilon"):
        scheduler = cls.from_config(sched_cfg, prediction_type=parts.objective)
    if parts.family in XL_FAMILIES:
        return StableDiffusionXLPipeline(vae=parts.vae, text_encoder=modules["text_encoder"],
                                         text_encoder_2=modules["text_encoder_2"], tokenizer=parts.tokenizers[0],
                                         tokenizer_2=parts.tokenizers[1], unet=modules["unet"], scheduler=scheduler)
    return StableDiffusionPipeline(vae=parts.vae, text_encoder=modules["text_encoder"], tokenizer=parts.tokenizers[0],
                                   unet=modules["unet"], scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def save_output(out: Path, parts: Parts, modules: dict, p: dict, family: str, base_path: Path,
                caption_records: list[dict], new_ids: list[list[int]]) -> None:
    """The method's files (dbkit/methods/), pivotal's token embeddings and the training
    metadata. Written to a temp folder, then renamed into place."""
    from . import export, methods

    tmp = out.parent / (out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = export.training_metadata(p, family, base_path, caption_records) | {"objective": parts.objective}
    methods.get(p["train"]["method"]).save(tmp, modules, meta, lambda: inference_pipeline(parts, modules, base_path))
    if new_ids:
        export.save_embeddings(tmp, modules, pivotal_tokens(p), new_ids)
    atomic_write_json(tmp / "training_metadata.json", meta)
    atomic_write_text(tmp / "README.md", export.model_card(meta))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
