"""Full fine-tuning: the UNet and/or text encoders train themselves; the result is a diffusers
pipeline folder (`output/pipeline/`, `from_pretrained`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import Method


class Full(Method):
    name = "full"
    adapter = False

    def apply(self, parts: Any, p: dict) -> None:
        t = p["train"]
        parts.unet.requires_grad_(t["unet"])
        for te in parts.text_encoders:
            te.requires_grad_(t["text_encoder"])
            te.get_input_embeddings().requires_grad_(False)  # the vocabulary stays; pivotal tunes new rows

    def save(self, out: Path, modules: dict, meta: dict, pipeline: Callable[[], Any]) -> None:
        pipeline().save_pretrained(out / "pipeline", safe_serialization=True)

    def load(self, pipe: Any, out: Path, weight_name: str, scale: float) -> None:
        return None  # the pipeline folder is the model; nothing to add to it


FULL = Full()
