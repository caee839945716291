"""Base models: resolve `base.model` to a local diffusers folder, detect its family, load parts.

Families decide what the trainer predicts and how it conditions:
- sd15: epsilon prediction, one CLIP text encoder;
- sd2: v-prediction when the scheduler config says so, one OpenCLIP-style text encoder (the
  toy world's base: a v-prediction SD-architecture pipeline, so it is detected as sd2);
- sdxl: two text encoders, pooled embeddings and size/crop conditioning;
- playground: SDXL architecture trained with EDM (Playground v2.5), EDM schedulers.
Nothing is downloaded: a hub id only works when it is already in the local HF cache.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

FAMILIES = ("sd15", "sd2", "sdxl", "playground")


class ModelError(ValueError):
    """The base model cannot be used as asked; the message says what to do."""


def resolve(model: str) -> Path:
    """`toyworld`, a local diffusers folder, or a hub id already in the local cache.
    (config.load calls this too, so a bad base.model fails before any work starts.)"""
    if model == "toyworld":
        from .toyworld import base_model_path

        return base_model_path()
    path = Path(model)
    if (path / "model_index.json").exists():
        return path
    if path.is_file():  # a single-file checkpoint or one file of the folder: not a hub id either
        raise ModelError(f"base.model: {model} is a file; point it at the model folder (the one with "
                         "model_index.json) or 'toyworld'")
    if path.is_dir():
        raise ModelError(f"'base.model' folder {model!r} has no model_index.json: point base.model at a diffusers "
                         "pipeline folder (one written by save_pretrained)")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise ModelError(f"'base.model' folder {model!r} does not exist (relative to {Path.cwd()}): "
                         "use \"toyworld\", a local diffusers folder, or a cached hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any failure means "not available offline"
        raise ModelError(
            f"'base.model' {model!r} is neither a local folder nor in the Hugging Face cache, and this machine "
            "cannot download weights: download the model elsewhere (e.g. `huggingface-cli download <id> "
            "--local-dir <folder>`), copy it here and point base.model at that folder"
        ) from e


# Bases up to this size are fingerprinted by content; larger ones (real SD checkpoints, GBs)
# by file names, sizes and modification times, which a re-download or an edit also changes.
_CONTENT_HASH_LIMIT = 256 * 2**20


def fingerprint(model: str) -> str | None:
    """A short hash of the base model's files (None if it does not resolve): part of the run
    identity and of cache keys, so new weights under the same name or folder never reuse
    runs, class images or metrics made with the old ones."""
    import hashlib

    try:
        path = resolve(model)
    except ModelError:
        return None
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name != "README.md")
    by_content = sum(f.stat().st_size for f in files) <= _CONTENT_HASH_LIMIT
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:".encode())
        h.update(f.read_bytes() if by_content else str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def detect_family(path: Path) -> str:
    index = json.loads((path / "model_index.json").read_text())
    sched = {}
    sched_file = path / "scheduler" / "scheduler_config.json"
    if sched_file.exists():
        sched = json.loads(sched_file.read_text())
    if "XL" in index.get("_class_name", "") or "text_encoder_2" in index:
        edm = "EDM" in sched.get("_class_name", "") or sched.get("prediction_type") == "edm"
        return "playground" if edm else "sdxl"
    return "sd2" if sched.get("prediction_type") == "v_prediction" else "sd15"


def resolution_step(path: Path) -> int | None:
    """The pixels per side that one cell of the UNet's deepest block covers: the VAE's
    downsampling times the UNet's (2 per down block but the last), read from their config
    files, not the weights. A training resolution must be a multiple of it and at least it, or
    the smallest latents vanish in the down blocks. None where the configs do not say."""
    try:
        vae = json.loads((path / "vae" / "config.json").read_text())
        unet = json.loads((path / "unet" / "config.json").read_text())
        return 2 ** (len(vae["block_out_channels"]) - 1) * 2 ** (len(unet["down_block_types"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):  # another architecture: nothing to check here
        return None


def family_of(p: dict, path: Path) -> str:
    fam = p["base"]["family"]
    found = detect_family(path)
    if fam != "auto" and fam != found:
        raise ModelError(f"base.family={fam} but {path} is a {found} model; set base.family: auto or {found}")
    return found


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading progress bars off: a page that loads twenty
    models (ablations, merges) would otherwise show forty bars and nothing else."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def load_pipeline(path: Path, family: str, dtype=None):
    """The diffusers inference pipeline for a base (safety checker off: research use)."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    dtype = dtype or torch.float32
    with quiet_loading():
        if family in ("sdxl", "playground"):
            return StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype)
        return StableDiffusionPipeline.from_pretrained(path, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)


# --------------------------------------------------------------------------- random twins
# No weights can be downloaded here, so every family is exercised on a randomly initialised
# model of the same classes and wiring, built from config: tiny for the CPU test suite, or
# at full size (the real architectures' configs) for a GPU check with `dbkit bench families`.

def _unet_config(family: str, full: bool) -> dict:
    xl = family in ("sdxl", "playground")
    if full and xl:
        return dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    if full:  # SD1.5 (SD2 differs by heads/linear projection/1024-d text)
        sd2 = family == "sd2"
        return dict(sample_size=96 if sd2 else 64, cross_attention_dim=1024 if sd2 else 768,
                    attention_head_dim=(5, 10, 20, 20) if sd2 else 8, use_linear_projection=sd2)
    base = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4))
    # SDXL's own block layout, narrow, so that its module names are the real ones (kohya's SDXL
    # names depend on them); two transformer layers where SDXL has ten (the suite's time; the
    # full config's names are checked on the meta device in tests/test_identity.py)
    if xl:
        return base | dict(block_out_channels=(32, 64, 64), layers_per_block=2,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 2),
                           cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                           addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    return base | dict(cross_attention_dim=32, use_linear_projection=family == "sd2")


def _text_config(vocab: int, hidden: int, layers: int, heads: int, projection: int | None = None) -> dict:
    cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
               num_attention_heads=heads, max_position_embeddings=77, bos_token_id=vocab - 2,
               eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_act="gelu")
    if projection:
        cfg["projection_dim"] = projection
    return cfg


def _scheduler(family: str):
    from diffusers import DDIMScheduler, EDMDPMSolverMultistepScheduler, EulerDiscreteScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if family == "playground":
        return EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
                                              prediction_type="epsilon", final_sigmas_type="zero")
    if family == "sdxl":
        return EulerDiscreteScheduler(**common, timestep_spacing="leading", steps_offset=1)
    return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type="v_prediction" if family == "sd2" else "epsilon")


def build_random(family: str, path: Path, *, full: bool = False, seed: int = 0) -> Path:
    """Save a randomly initialised `family` pipeline (diffusers format) to `path`."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .toyworld.tokenizer import save_tokenizer

    if family not in FAMILIES:
        raise ModelError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tok_dir:
        save_tokenizer(Path(tok_dir))
        tok = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    vocab = 49408 if full else len(tok)
    if full:
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    else:
        vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    if family == "playground":  # Playground v2.5's VAE normalises latents per channel
        vae.register_to_config(latents_mean=[0.0, 0.0, 0.0, 0.0], latents_std=[1.0, 1.0, 1.0, 1.0],
                               scaling_factor=0.5)
    unet = UNet2DConditionModel(**_unet_config(family, full))
    xl = family in ("sdxl", "playground")
    if xl:
        te1 = CLIPTextModel(CLIPTextConfig(**_text_config(vocab, *((768, 12, 12) if full else (32, 2, 4)))))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_text_config(
            vocab, *((1280, 32, 20) if full else (32, 2, 4)), projection=1280 if full else 32)))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=_scheduler(family))
    else:
        dims = ((1024, 23, 16) if family == "sd2" else (768, 12, 12)) if full else (32, 2, 4)
        te = CLIPTextModel(CLIPTextConfig(**_text_config(vocab, *dims)))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                       scheduler=_scheduler(family), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
