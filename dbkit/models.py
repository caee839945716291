"""Base models: resolve `base.model` to a local diffusers folder, detect its family, load parts.

Families decide what the trainer predicts and how it conditions:
- sd15: epsilon prediction, one CLIP text encoder (also the toy world);
- sd2: v-prediction when the scheduler config says so, one OpenCLIP-style text encoder;
- sdxl: two text encoders, pooled embeddings and size/crop conditioning;
- playground: SDXL architecture trained with EDM (Playground v2.5), EDM schedulers.
Nothing is downloaded: a hub id only works when it is already in the local HF cache.
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("sd15", "sd2", "sdxl", "playground")


class ModelError(ValueError):
    """The base model cannot be used as asked; the message says what to do."""


def resolve(model: str) -> Path:
    """`toyworld`, a local diffusers folder, or a hub id already in the local cache."""
    if model == "toyworld":
        from .toyworld import base_model_path

        return base_model_path()
    path = Path(model)
    if (path / "model_index.json").exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any failure means "not available offline"
        raise ModelError(
            f"base.model={model!r}: not a local diffusers folder and not in the Hugging Face cache ({e}). "
            "Weights cannot be downloaded at run time: download the model where you have network and set "
            "base.model to its local folder."
        ) from e


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


def family_of(p: dict, path: Path) -> str:
    fam = p["base"]["family"]
    found = detect_family(path)
    if fam != "auto" and fam != found:
        raise ModelError(f"base.family={fam} but {path} is a {found} model; set base.family: auto or {found}")
    return found


def load_pipeline(path: Path, family: str, dtype=None):
    """The diffusers inference pipeline for a base (safety checker off: research use)."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    dtype = dtype or torch.float32
    if family in ("sdxl", "playground"):
        return StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype)
    return StableDiffusionPipeline.from_pretrained(path, dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
