"""Training methods, one module each: `lora` (LoRA and DoRA), `lokr`, `full`.

Adding a method is one new module with a `Method` subclass (dbkit/methods/base.py: check,
apply, save, load) plus a line in METHODS and its defaults in params/base.yaml; params
validation, the training loop and the loaders find it here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Method, ParamsProblem
from .full import FULL
from .lokr import LOKR
from .lora import DORA, LORA

METHODS: dict[str, Method] = {m.name: m for m in (LORA, DORA, LOKR, FULL)}

__all__ = ["METHODS", "Method", "ParamsProblem", "get", "load_trained", "trained_with"]


def get(name: str) -> Method:
    """The method `train.method` names (config has checked the name)."""
    return METHODS[name]


def trained_with(meta: dict) -> Method:
    """The method a saved result was trained with, from its training metadata: `lora+pivotal`
    is LoRA's files plus embeddings, and a merge (`merge:<how>`) writes LoRA files."""
    name = str(meta.get("method") or "lora").split("+")[0]
    return METHODS.get(name, LORA)


def load_trained(out: Path, base_path: Path, family: str, *, lora_scale: float = 1.0,
                 lora_file: str | None = None) -> Any:
    """An inference pipeline for a run's output (an adapter scaled by `lora_scale`), through
    diffusers' public loaders, as a user of the files gets it."""
    from .. import export
    from ..models import load_pipeline

    lora_file = lora_file or export.LORA_FILE
    full = (out / "pipeline" / "model_index.json").exists()
    pipe = load_pipeline(out / "pipeline" if full else base_path, family)
    meta = export.read_metadata(out)
    objective = meta.get("objective")
    if objective in ("epsilon", "v_prediction") and pipe.scheduler.config.get("prediction_type") != objective:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=objective)
    if (out / export.EMBEDDINGS_FILE).exists() and not full:
        export.add_embeddings(pipe, out / export.EMBEDDINGS_FILE)
    if (out / lora_file).exists():
        trained_with(meta).load(pipe, out, lora_file, lora_scale)
    return pipe
