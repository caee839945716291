"""The DreamBooth training loop: LoRA / DoRA / full fine-tuning, pivotal tuning, prior
preservation, Min-SNR, offset noise, EMA, checkpoints with resume, previews during training.

One loop for every method, driven by the params (see params/base.yaml, section `train`).
It runs under `accelerate launch` on several GPUs unchanged (DDP), and on a laptop CPU.

Determinism: every random choice of step `s` (which images, captions, noise, timesteps,
LoRA dropout) comes from generators seeded by (seed, s, process), never from state carried
between steps, so a run resumed from a checkpoint ends with exactly the weights of an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from . import captions as cap
from . import data, diffusion
from .runs import atomic_write_json, atomic_write_text


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


def pivotal_tokens(p: dict) -> list[str]:
    return [f"<s{i}>" for i in range(p["train"]["pivotal"]["tokens"])]


def effective_params(p: dict) -> dict:
    """Params as the loop uses them: with pivotal tuning the identifier becomes the new
    tokens, so every caption and sample prompt names the subject by them."""
    if not p["train"]["pivotal"]["enabled"]:
        return p
    q = json.loads(json.dumps(p))
    q["captions"]["identifier"] = "".join(pivotal_tokens(p))
    return q


def check_combination(p: dict, family: str) -> None:
    """Refuse, before any work, combinations that cannot train."""
    t = p["train"]
    if t["pivotal"]["enabled"] and p["captions"]["trigger"] == "none":
        raise TrainingError("train.pivotal.enabled needs a token in the captions: set captions.trigger to "
                            "identifier or word (the new tokens replace captions.identifier)")
    if t["method"] in ("lora", "dora") and not (t["unet"] or t["text_encoder"] or t["pivotal"]["enabled"]):
        raise TrainingError("nothing to train: set train.unet or train.text_encoder to true")
    if t["optimizer"] == "prodigy" and t["lr"] < 0.1:
        raise TrainingError(f"train.optimizer=prodigy adapts its own step size and expects train.lr≈1.0 "
                            f"(got {t['lr']}); set train.lr: 1.0 and train.text_encoder_lr: 1.0")
    convs = [m for m in t["lora"]["unet_targets"] if m.split(".")[-1].startswith("conv")]
    if t["method"] == "dora" and t["unet"] and convs:
        raise TrainingError(f"train.method=dora with convolution targets {convs}: diffusers cannot load DoRA "
                            "convolutions back (meta-device error); remove them from train.lora.unet_targets")
    if t["min_snr_gamma"] > 0 and (t["prediction"] == "edm" or family == "playground"):
        raise TrainingError("train.min_snr_gamma is defined for DDPM timesteps, not EDM's σ: set it to 0 "
                            "(EDM's λ(σ) weighting already balances noise levels)")
    if t["log_with"] != "none":
        import importlib.util

        if importlib.util.find_spec(t["log_with"]) is None:
            raise TrainingError(f"train.log_with={t['log_with']} needs `pip install {t['log_with']}`; "
                                "or set train.log_with: none (train_log.jsonl is always written)")
    if t["mixed_precision"] == "fp16" and not torch.cuda.is_available():
        raise TrainingError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")


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


def refuse_dora_convs(unet, targets: list[str]) -> None:
    """diffusers cannot load DoRA on convolutions back (meta-device error at inference), and
    which targets are convolutions depends on the model (proj_in/proj_out are 1×1 convs in
    SD1.x, linear in SD2/SDXL), so the modules themselves are checked before training."""
    import torch.nn as nn

    convs = sorted({t for name, mod in unet.named_modules() if isinstance(mod, nn.Conv2d)
                    for t in targets if name == t or name.endswith("." + t)})
    if convs:
        raise TrainingError(f"train.method=dora with targets that are convolutions in this UNet {convs}: diffusers "
                            "cannot load DoRA convolutions back (meta-device error); remove them from "
                            "train.lora.unet_targets")


def apply_method(parts: Parts, p: dict) -> None:
    """Mark what trains: LoRA/DoRA adapters through peft, or the full weights."""
    t = p["train"]
    for m in (parts.vae, parts.unet, *parts.text_encoders):
        m.requires_grad_(False)
    if t["method"] in ("lora", "dora"):
        from peft import LoraConfig

        lo = t["lora"]

        def config(targets: list[str]) -> LoraConfig:
            return LoraConfig(r=lo["rank"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
                              init_lora_weights="gaussian", target_modules=targets, use_dora=t["method"] == "dora")

        if t["unet"]:
            if t["method"] == "dora":
                refuse_dora_convs(parts.unet, lo["unet_targets"])
            parts.unet.add_adapter(config(lo["unet_targets"]))
        if t["text_encoder"]:
            for te in parts.text_encoders:
                te.add_adapter(config(lo["text_targets"]))
    else:
        parts.unet.requires_grad_(t["unet"])
        for te in parts.text_encoders:
            te.requires_grad_(t["text_encoder"])
            te.get_input_embeddings().requires_grad_(False)  # the vocabulary stays; pivotal tunes new rows
    if t["gradient_checkpointing"]:
        parts.unet.enable_gradient_checkpointing()
        if t["text_encoder"]:
            for te in parts.text_encoders:
                te.gradient_checkpointing_enable()


def make_optimizer(groups: list[dict], t: dict) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if t["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, weight_decay=t["weight_decay"])
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


def load_examples(records: list[dict], p: dict) -> list[Example]:
    """Images at training size. Square crops by default; with random crops (data.center_crop
    false) the short side is scaled to the resolution and the crop is taken at each step;
    with data.buckets each image keeps its aspect ratio in the nearest bucket."""
    d = p["data"]
    res = d["resolution"]
    out = []
    for r in records:
        im = data.open_rgb(Path(r["file"]))
        bucket = None
        if d["buckets"]:
            bucket = data.bucket_for(*im.size, res, step=64 if res >= 256 else 8)
            im = data.cover_crop(im, bucket)
        elif d["center_crop"]:
            im = data.crop_resize(im, res, center=True)
        else:
            im = data.scale_short_side(im, res)
        ex = Example(data.to_tensor(im), r, bucket=bucket)
        out.append(ex)
        if d["flip"]:
            out.append(Example(torch.flip(ex.pixels, dims=[2]), r, bucket=bucket))
    return out * d["repeats"]


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
    """A class image reshaped to the instance batch's bucket (encoded at the step, uncached)."""
    if bucket is None or tuple(ex.pixels.shape[1:][::-1]) == bucket:
        return ex
    im = data.to_image(ex.pixels)
    return Example(data.to_tensor(data.cover_crop(im, bucket)), ex.record, bucket=bucket)


def crop(pixels: torch.Tensor, res: int, gen: torch.Generator) -> torch.Tensor:
    _, h, w = pixels.shape
    y = int(torch.randint(0, h - res + 1, (1,), generator=gen))
    x = int(torch.randint(0, w - res + 1, (1,), generator=gen))
    return pixels[:, y : y + res, x : x + res]


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
    todo = [k for k, e in enumerate(batch) if e.latent is None]
    fresh = {}
    if todo:  # not cached: random crops, or class images fitted to a bucket
        pixels = torch.stack([batch[k].pixels if batch[k].bucket else crop(batch[k].pixels, res, gen) for k in todo])
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


def save_checkpoint(ckpt_root: Path, step: int, modules: dict, optimizer, lr_sched, ema, keep: int) -> Path:
    """Write checkpoint-<step>/ atomically (temp folder + rename), then apply retention."""
    final = ckpt_root / f"checkpoint-{step:06d}"
    tmp = ckpt_root / f".tmp-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {"step": step, "params": all_params_state(modules), "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_sched.state_dict(), "ema": ema.state_dict() if ema else None}
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
    ckpts = sorted(ckpt_root.glob("checkpoint-*"))
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, modules: dict, optimizer, lr_sched, ema) -> int:
    state = torch.load(path / "state.pt", weights_only=False)
    params = dict(state["params"])
    with torch.no_grad():
        for name, m in modules.items():
            if f"{name}.__embeddings__" in params:
                m.get_input_embeddings().weight.copy_(params.pop(f"{name}.__embeddings__"))
        for name, m in modules.items():
            for k, v in m.named_parameters():
                key = f"{name}.{k}"
                if key in params:
                    v.copy_(params[key])
    optimizer.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_scheduler"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    return int(state["step"])


# --------------------------------------------------------------------------- the loop


def encode_text(parts: Parts, prompts: list[str], memo: dict | None, res: int) -> tuple[torch.Tensor, dict | None]:
    """Text conditioning for the UNet: hidden states (and for SDXL-style bases the pooled
    embedding and size/crop ids). `memo` (caption → embeddings) is used only while every
    text encoder is frozen, so it stays correct under caption shuffling and dropout."""
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
    # original size, crop top-left, target size: the whole image at training resolution
    time_ids = torch.tensor([[res, res, 0, 0, res, res]] * len(rows), dtype=ehs.dtype, device=ehs.device)
    return ehs, {"text_embeds": torch.stack([pl for _, pl in rows]), "time_ids": time_ids}


def step_generators(seed: int, step: int, rank: int) -> tuple[torch.Generator, random.Random]:
    s = (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63)
    return torch.Generator().manual_seed(s), random.Random(s)


def train(p: dict, run_dir: Path, caption_records: list[dict], *, base_path: Path, family: str,
          class_dir: Path | None = None, log=None, progress: bool = True, max_steps: int | None = None,
          preview=None) -> Path:
    """Train and write the result to run_dir/output; resumes from run_dir/checkpoints.

    `max_steps` stops early (used by the kill-and-resume test to simulate an interruption);
    `preview(step, pipe)` is called at `train.sample_every` with an inference pipeline.
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    check_combination(p, family)
    run_dir.mkdir(parents=True, exist_ok=True)
    p = effective_params(p)
    t, res = p["train"], p["data"]["resolution"]
    trackers = None if t["log_with"] == "none" else t["log_with"]
    reset_accelerate_state()
    accel = Accelerator(mixed_precision=t["mixed_precision"], gradient_accumulation_steps=t["grad_accum"],
                        log_with=trackers, project_dir=str(run_dir / "logs"))
    if trackers:
        accel.init_trackers(p["experiment"] or "dbkit", config={"params_hash": run_dir.name})
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
    dev = accel.device
    parts.vae.to(dev)

    instance = load_examples(caption_records, p)
    prior_prompt = cap.expand(p["prior"]["class_prompt"], p)
    klass: list[Example] = []
    if p["prior"]["enabled"]:
        if class_dir is None:
            raise TrainingError("prior.enabled but no class images were prepared (run 01_data first)")
        recs = [{"file": str(f), "caption": prior_prompt, "tags": [prior_prompt]} for f in data.list_images(class_dir)]
        klass = load_examples(recs, {**p, "data": {**p["data"], "flip": False, "repeats": 1, "center_crop": True}})
    if t["cache_latents"] and p["data"]["center_crop"]:  # random crops differ every step: nothing to cache
        cache_latents(parts.vae, instance + klass)

    te_params = [q for te in parts.text_encoders for n, q in te.named_parameters()
                 if q.requires_grad and "token_embedding" not in n]
    groups = [
        {"params": [q for q in parts.unet.parameters() if q.requires_grad], "lr": t["lr"], "name": "unet"},
        {"params": te_params, "lr": t["text_encoder_lr"], "name": "text_encoder"},
        {"params": [e.weight for e in embs] if new_ids else [], "lr": t["pivotal"]["lr"], "name": "embeddings",
         "weight_decay": 0.0},
    ]
    optimizer = make_optimizer(groups, t)
    lr_sched = get_scheduler(t["lr_scheduler"], optimizer, num_warmup_steps=t["warmup_steps"] * accel.num_processes,
                             num_training_steps=t["steps"] * accel.num_processes)
    trainable = [q for g in groups for q in g["params"]]
    ema = EMAModel(trainable, decay=t["ema_decay"]) if t["ema_decay"] > 0 else None
    unet, *tes = accel.prepare(parts.unet, *parts.text_encoders)
    optimizer, lr_sched = accel.prepare(optimizer, lr_sched)
    modules = {"unet": accel.unwrap_model(unet)}
    modules.update({name: accel.unwrap_model(te) for name, te in zip(parts.te_names, tes)})
    parts.text_encoders = tes

    ckpt_root = run_dir / "checkpoints"
    start = 0
    last = latest_checkpoint(ckpt_root)
    if last is not None:
        start = load_checkpoint(last, modules, optimizer, lr_sched, ema)
    log_path = run_dir / "train_log.jsonl"
    if log_path.exists():  # drop what an interrupted run logged past its last checkpoint
        kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
        atomic_write_text(log_path, "".join(line + "\n" for line in kept))
    te_stop = math.ceil(t["text_encoder_fraction"] * t["steps"])
    ti_stop = math.ceil(t["pivotal"]["ti_fraction"] * t["steps"])
    memo: dict | None = {} if not te_params and not new_ids else None
    end = t["steps"] if max_steps is None else min(t["steps"], max_steps)
    bar = tqdm(range(start, end), initial=start, total=t["steps"], desc="train", disable=not progress)
    t0 = time.time()
    sched = parts.noise_scheduler
    for step in bar:
        gen, rng = step_generators(p["seed"], step, accel.process_index)
        torch.manual_seed(gen.initial_seed())  # LoRA dropout draws from the global RNG
        te_on = step < te_stop and bool(te_params)
        ti_on = step < ti_stop and bool(new_ids)
        if memo is None and not te_on and not ti_on:
            memo = {}  # text side frozen from here on: embeddings can be memoised
        idx = batch_indices(instance, step, t["batch_size"], p["seed"], accel.process_index)
        batch = [instance[i] for i in idx]
        prompts = [cap.train_caption(e.record, p, rng) for e in batch]
        if klass:
            cidx = epoch_indices(len(klass), step, t["batch_size"], p["seed"] + 1, accel.process_index)
            batch += [fit_to(klass[i], batch[0].bucket) for i in cidx]
            prompts += [prior_prompt] * len(cidx)
        with oom_advice(t, step), accel.accumulate(unet, *tes):
            latents = sample_latents(parts.vae, batch, gen, res).to(dev)
            noise = torch.randn(latents.shape, generator=gen)
            if t["noise_offset"]:
                noise += t["noise_offset"] * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=gen)
            noise = noise.to(dev)
            noised = diffusion.noise_latents(sched, latents, noise, gen, parts.objective)
            with torch.set_grad_enabled(te_on or ti_on):
                ehs, added = encode_text(parts, prompts, None if (te_on or ti_on) else memo, res)
            with accel.autocast():
                pred = unet(noised.model_input, noised.timesteps, ehs, added_cond_kwargs=added).sample
            per = diffusion.per_sample_loss(sched, pred, latents, noise, noised, parts.objective)
            w = diffusion.snr_weights(sched, noised.timesteps.cpu(), t["min_snr_gamma"], parts.objective)
            loss, l_inst, l_prior = diffusion.dreambooth_loss(per, w, len(idx), p["prior"]["weight"])
            if not torch.isfinite(loss):
                kept = latest_checkpoint(ckpt_root)
                raise TrainingError(f"loss became {loss.item()} at step {step}: lower train.lr (now {t['lr']}) "
                                    f"or enable train.max_grad_norm; last good checkpoint: {kept}")
            accel.backward(loss)
            if not te_on:
                for q in te_params:
                    q.grad = None
            if not ti_on and new_ids:
                for e in embs:
                    e.weight.grad = None
            if accel.sync_gradients and t["max_grad_norm"] > 0:
                accel.clip_grad_norm_([q for q in trainable if q.grad is not None], t["max_grad_norm"])
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            if new_ids:
                restore_vocabulary(embs, orig_embs, new_ids)
        if ema is not None:
            ema.step(trainable)
        rec = {"step": step + 1, "loss": loss.item(), "loss_instance": l_inst.item(), "loss_prior": l_prior.item(),
               "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.time() - t0, 2)}
        if trackers:
            accel.log(rec, step=step + 1)
        if accel.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if log:
                log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        done = step + 1
        if accel.is_main_process and t["save_every"] and done % t["save_every"] == 0 and done < t["steps"]:
            save_checkpoint(ckpt_root, done, modules, optimizer, lr_sched, ema, t["keep_checkpoints"])
        if accel.is_main_process and preview and t["sample_every"] and done % t["sample_every"] == 0:
            preview(done, inference_pipeline(parts, modules, base_path))
    if trackers:
        accel.end_training()
    if end < t["steps"]:
        return run_dir  # stopped early on purpose (max_steps)
    accel.wait_for_everyone()
    if ema is not None:
        ema.copy_to(trainable)
    out = run_dir / "output"
    if accel.is_main_process:
        save_output(out, parts, modules, p, family, base_path, caption_records, new_ids)
    return out


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

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    parts.vae.to(dtype=dtype)
    for m in (parts.unet, *parts.text_encoders):
        if t["method"] in ("lora", "dora") or not any(q.requires_grad for q in m.parameters()):
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
    """LoRA: diffusers + kohya safetensors with training metadata; full: a pipeline folder;
    pivotal: the new token embeddings. Written to a temp folder, then renamed into place."""
    from . import export

    tmp = out.parent / (out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = export.training_metadata(p, family, base_path, caption_records) | {"objective": parts.objective}
    if p["train"]["method"] in ("lora", "dora"):
        export.save_lora(tmp, modules, meta)
    else:
        inference_pipeline(parts, modules, base_path).save_pretrained(tmp / "pipeline", safe_serialization=True)
    if new_ids:
        export.save_embeddings(tmp, modules, pivotal_tokens(p), new_ids)
    atomic_write_json(tmp / "training_metadata.json", meta)
    atomic_write_text(tmp / "README.md", export.model_card(meta))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
