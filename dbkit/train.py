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

import dataclasses
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import captions as cap
from . import data
from .runs import atomic_write_json, atomic_write_text


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and which knob to turn."""


@dataclasses.dataclass
class Parts:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    family: str


def load_parts(path: Path, family: str) -> Parts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if family in ("sdxl", "playground"):
        raise TrainingError(f"{family} bases are not supported by this trainer yet; use an SD1.x/SD2.x base")
    return Parts(
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder"),
        vae=AutoencoderKL.from_pretrained(path / "vae"),
        unet=UNet2DConditionModel.from_pretrained(path / "unet"),
        noise_scheduler=DDPMScheduler.from_pretrained(path / "scheduler"),
        family=family,
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
    if t["mixed_precision"] == "fp16" and not torch.cuda.is_available():
        raise TrainingError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")


# --------------------------------------------------------------------------- setup


def add_pivotal_tokens(parts: Parts, p: dict) -> list[int]:
    """Add <s0>…<sN> to the tokenizer, initialised from the class noun's embedding."""
    tokens = pivotal_tokens(p)
    parts.tokenizer.add_tokens(tokens)
    emb = parts.text_encoder.get_input_embeddings()
    init_ids = parts.tokenizer(p["captions"]["class_noun"], add_special_tokens=False).input_ids
    init = emb.weight.data[init_ids].mean(0)
    parts.text_encoder.resize_token_embeddings(len(parts.tokenizer))
    emb = parts.text_encoder.get_input_embeddings()
    ids = parts.tokenizer.convert_tokens_to_ids(tokens)
    with torch.no_grad():
        for i in ids:
            emb.weight[i] = init
    return ids


def apply_method(parts: Parts, p: dict) -> None:
    """Mark what trains: LoRA/DoRA adapters through peft, or the full weights."""
    t = p["train"]
    for m in (parts.vae, parts.unet, parts.text_encoder):
        m.requires_grad_(False)
    if t["method"] in ("lora", "dora"):
        from peft import LoraConfig

        lo = t["lora"]

        def config(targets: list[str]) -> LoraConfig:
            return LoraConfig(r=lo["rank"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
                              init_lora_weights="gaussian", target_modules=targets, use_dora=t["method"] == "dora")

        if t["unet"]:
            parts.unet.add_adapter(config(lo["unet_targets"]))
        if t["text_encoder"]:
            parts.text_encoder.add_adapter(config(lo["text_targets"]))
    else:
        parts.unet.requires_grad_(t["unet"])
        parts.text_encoder.requires_grad_(t["text_encoder"])
    if t["gradient_checkpointing"]:
        parts.unet.enable_gradient_checkpointing()
        if t["text_encoder"]:
            parts.text_encoder.gradient_checkpointing_enable()


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


def load_examples(records: list[dict], p: dict) -> list[Example]:
    res, d = p["data"]["resolution"], p["data"]
    out = []
    for r in records:
        img = data.crop_resize(data.open_rgb(Path(r["file"])), res, center=True)
        ex = Example(data.to_tensor(img), r)
        out.append(ex)
        if d["flip"]:
            out.append(Example(torch.flip(ex.pixels, dims=[2]), r))
    return out * d["repeats"]


@torch.no_grad()
def cache_latents(vae, examples: list[Example], batch: int = 64) -> None:
    """Encode every example once; the loop samples from the cached distribution each step
    (mean + σ·ε with that step's generator), which is what encoding every step would give."""
    for k in range(0, len(examples), batch):
        chunk = examples[k : k + batch]
        params = vae.encode(torch.stack([e.pixels for e in chunk]).to(vae.device, vae.dtype)).latent_dist.parameters
        for e, lat in zip(chunk, params):
            e.latent = lat.float().cpu()


def sample_latents(vae, batch: list[Example], gen: torch.Generator) -> torch.Tensor:
    if batch[0].latent is not None:
        params = torch.stack([e.latent for e in batch])
    else:
        with torch.no_grad():
            params = vae.encode(torch.stack([e.pixels for e in batch]).to(vae.device, vae.dtype)
                                ).latent_dist.parameters.float().cpu()
    mean, logvar = params.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30, 20))
    z = mean + std * torch.randn(mean.shape, generator=gen)
    return z * vae.config.scaling_factor


def epoch_indices(n: int, step: int, batch: int, seed: int, salt: int) -> list[int]:
    """Indices for one step, walking seeded per-epoch permutations (resume-safe)."""
    out = []
    for k in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch * 31 + salt))
        out.append(int(perm[pos]))
    return out


# --------------------------------------------------------------------------- loss


def target_for(sched, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return sched.get_velocity(latents, noise, t)
    raise TrainingError(f"prediction_type {kind!r} of the base's scheduler is not supported")


def snr_weights(sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weight per sample (Hang et al. 2023); 1 everywhere when γ = 0."""
    if gamma <= 0:
        return torch.ones(t.shape[0])
    ac = sched.alphas_cumprod.to(t.device)[t].float()
    snr = ac / (1 - ac)
    w = torch.clamp(snr, max=gamma) / snr
    if sched.config.prediction_type == "v_prediction":
        w = torch.clamp(snr, max=gamma) / (snr + 1)
    return w


def dreambooth_loss(per_sample: torch.Tensor, weights: torch.Tensor, n_instance: int,
                    prior_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """instance + λ·prior from one forward pass over the concatenated batch. The Min-SNR
    weights are applied per sample, so each half is weighted by its own timesteps (the
    diffusers scripts weight the instance half with weights computed for the whole batch)."""
    wl = weights.to(per_sample.device) * per_sample
    inst = wl[:n_instance].mean()
    if per_sample.shape[0] == n_instance:
        return inst, inst, torch.zeros_like(inst)
    prior = wl[n_instance:].mean()
    return inst + prior_weight * prior, inst, prior


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
    """Trainable parameters plus the (possibly grown) token embedding for pivotal tuning."""
    state = trainable_state(modules)
    te = modules["text_encoder"]
    state["text_encoder.__embeddings__"] = te.get_input_embeddings().weight.detach().cpu().clone()
    return state


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpts = sorted(ckpt_root.glob("checkpoint-*"))
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, modules: dict, optimizer, lr_sched, ema) -> int:
    state = torch.load(path / "state.pt", weights_only=False)
    params = dict(state["params"])
    emb = params.pop("text_encoder.__embeddings__")
    with torch.no_grad():
        modules["text_encoder"].get_input_embeddings().weight.copy_(emb)
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


def encode_text(parts: Parts, prompts: list[str], memo: dict | None) -> torch.Tensor:
    """Text embeddings; `memo` (caption → embedding) is used only while the text encoder is
    frozen, so it stays correct under caption shuffling and dropout."""
    tok = parts.tokenizer
    if memo is not None and all(pr in memo for pr in prompts):
        return torch.stack([memo[pr] for pr in prompts])
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(parts.text_encoder.device)
    out = parts.text_encoder(ids)[0]
    if memo is not None:
        for pr, e in zip(prompts, out.detach()):
            memo[pr] = e
    return out


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
    t = p["train"]
    accel = Accelerator(mixed_precision=t["mixed_precision"], gradient_accumulation_steps=t["grad_accum"])
    torch.manual_seed(p["seed"])
    parts = load_parts(base_path, family)
    new_ids = add_pivotal_tokens(parts, p) if t["pivotal"]["enabled"] else []
    apply_method(parts, p)
    emb = parts.text_encoder.get_input_embeddings()
    if new_ids:
        emb.weight.requires_grad_(True)
    orig_emb = emb.weight.detach().clone()
    dev = accel.device
    parts.vae.to(dev)

    instance = load_examples(caption_records, p)
    prior_prompt = cap.expand(p["prior"]["class_prompt"], p)
    klass: list[Example] = []
    if p["prior"]["enabled"]:
        if class_dir is None:
            raise TrainingError("prior.enabled but no class images were prepared (run 01_data first)")
        recs = [{"file": str(f), "caption": prior_prompt, "tags": [prior_prompt]} for f in data.list_images(class_dir)]
        klass = load_examples(recs, {**p, "data": {**p["data"], "flip": False, "repeats": 1}})
    if t["cache_latents"]:
        cache_latents(parts.vae, instance + klass)

    te_params = [q for n, q in parts.text_encoder.named_parameters() if q.requires_grad and "token_embedding" not in n]
    groups = [
        {"params": [q for q in parts.unet.parameters() if q.requires_grad], "lr": t["lr"], "name": "unet"},
        {"params": te_params, "lr": t["text_encoder_lr"], "name": "text_encoder"},
        {"params": [emb.weight] if new_ids else [], "lr": t["pivotal"]["lr"], "name": "embeddings",
         "weight_decay": 0.0},
    ]
    optimizer = make_optimizer(groups, t)
    lr_sched = get_scheduler(t["lr_scheduler"], optimizer, num_warmup_steps=t["warmup_steps"] * accel.num_processes,
                             num_training_steps=t["steps"] * accel.num_processes)
    trainable = [q for g in groups for q in g["params"]]
    ema = EMAModel(trainable, decay=t["ema_decay"]) if t["ema_decay"] > 0 else None
    unet, text_encoder, optimizer, lr_sched = accel.prepare(parts.unet, parts.text_encoder, optimizer, lr_sched)
    parts.unet, parts.text_encoder = unet, text_encoder
    modules = {"unet": accel.unwrap_model(unet), "text_encoder": accel.unwrap_model(text_encoder)}

    ckpt_root = run_dir / "checkpoints"
    start = 0
    last = latest_checkpoint(ckpt_root)
    if last is not None:
        start = load_checkpoint(last, modules, optimizer, lr_sched, ema)
    log_path = run_dir / "train_log.jsonl"
    if start == 0 and log_path.exists():
        log_path.unlink()
    te_stop = math.ceil(t["text_encoder_fraction"] * t["steps"])
    ti_stop = math.ceil(t["pivotal"]["ti_fraction"] * t["steps"])
    memo: dict | None = {} if not te_params and not new_ids else None
    end = t["steps"] if max_steps is None else min(t["steps"], max_steps)
    bar = tqdm(range(start, end), initial=start, total=t["steps"], desc="train", disable=not progress)
    t0 = time.time()
    for step in bar:
        gen, rng = step_generators(p["seed"], step, accel.process_index)
        torch.manual_seed(gen.initial_seed())  # LoRA dropout draws from the global RNG
        te_on = step < te_stop and bool(te_params)
        ti_on = step < ti_stop and bool(new_ids)
        if memo is None and not te_on and not ti_on:
            memo = {}  # text side frozen from here on: embeddings can be memoised
        idx = epoch_indices(len(instance), step, t["batch_size"], p["seed"], accel.process_index)
        batch = [instance[i] for i in idx]
        prompts = [cap.train_caption(e.record, p, rng) for e in batch]
        if klass:
            cidx = epoch_indices(len(klass), step, t["batch_size"], p["seed"] + 1, accel.process_index)
            batch += [klass[i] for i in cidx]
            prompts += [prior_prompt] * len(cidx)
        with accel.accumulate(unet, text_encoder):
            latents = sample_latents(parts.vae, batch, gen).to(dev)
            noise = torch.randn(latents.shape, generator=gen)
            if t["noise_offset"]:
                noise += t["noise_offset"] * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=gen)
            noise = noise.to(dev)
            ts = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                               generator=gen).to(dev)
            noisy = parts.noise_scheduler.add_noise(latents, noise, ts)
            with torch.set_grad_enabled(te_on or ti_on):
                ehs = encode_text(parts, prompts, None if (te_on or ti_on) else memo)
            with accel.autocast():
                pred = unet(noisy, ts, ehs).sample
            target = target_for(parts.noise_scheduler, latents, noise, ts)
            per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            w = snr_weights(parts.noise_scheduler, ts.cpu(), t["min_snr_gamma"])
            loss, l_inst, l_prior = dreambooth_loss(per, w, len(idx), p["prior"]["weight"])
            if not torch.isfinite(loss):
                kept = latest_checkpoint(ckpt_root)
                raise TrainingError(f"loss became {loss.item()} at step {step}: lower train.lr (now {t['lr']}) "
                                    f"or enable train.max_grad_norm; last good checkpoint: {kept}")
            accel.backward(loss)
            if not te_on:
                for q in te_params:
                    q.grad = None
            if not ti_on and new_ids:
                emb.weight.grad = None
            if accel.sync_gradients and t["max_grad_norm"] > 0:
                accel.clip_grad_norm_([q for q in trainable if q.grad is not None], t["max_grad_norm"])
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            if new_ids:
                with torch.no_grad():  # only the new tokens' rows may move
                    keep = torch.ones(emb.weight.shape[0], dtype=torch.bool)
                    keep[new_ids] = False
                    emb.weight[keep] = orig_emb[keep].to(emb.weight.dtype)
        if ema is not None:
            ema.step(trainable)
        rec = {"step": step + 1, "loss": loss.item(), "loss_instance": l_inst.item(), "loss_prior": l_prior.item(),
               "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.time() - t0, 2)}
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
    if end < t["steps"]:
        return run_dir  # stopped early on purpose (max_steps)
    accel.wait_for_everyone()
    if ema is not None:
        ema.copy_to(trainable)
    out = run_dir / "output"
    if accel.is_main_process:
        save_output(out, parts, modules, p, family, base_path, caption_records, new_ids)
    return out


def inference_pipeline(parts: Parts, modules: dict, base_path: Path):
    """A StableDiffusionPipeline around the live (training) modules, for previews."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_pretrained(base_path / "scheduler")
    return StableDiffusionPipeline(vae=parts.vae, text_encoder=modules["text_encoder"], tokenizer=parts.tokenizer,
                                   unet=modules["unet"], scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def save_output(out: Path, parts: Parts, modules: dict, p: dict, family: str, base_path: Path,
                caption_records: list[dict], new_ids: list[int]) -> None:
    """LoRA: diffusers + kohya safetensors with training metadata; full: a pipeline folder;
    pivotal: the new token embeddings. Written to a temp folder, then renamed into place."""
    from . import export

    tmp = out.parent / (out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = export.training_metadata(p, family, base_path, caption_records)
    if p["train"]["method"] in ("lora", "dora"):
        export.save_lora(tmp, modules, meta)
    else:
        export.save_full(tmp, parts, modules, base_path)
    if new_ids:
        export.save_embeddings(tmp, parts, pivotal_tokens(p), new_ids)
    atomic_write_json(tmp / "training_metadata.json", meta)
    atomic_write_text(tmp / "README.md", export.model_card(meta))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
