"""LoRA and DoRA through peft's LoraConfig (`use_dora` for DoRA).

Written as diffusers' `pytorch_lora_weights.safetensors` (PEFT naming, the LoraConfig in its
header) and, for LoRA, kohya's `lora_kohya.safetensors` for the WebUI, ComfyUI and sd-scripts
(dbkit/export.py holds both layouts, which merges write too). DoRA writes the diffusers file
only: kohya's DoRA layout differs per tool.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import Method, ParamsProblem

# Module names that are convolutions in every diffusers UNet (ResNet blocks, resamplers, stem).
_UNET_CONVS = frozenset({"conv", "conv1", "conv2", "conv_in", "conv_out", "conv_shortcut"})


def unet_convs(model: str) -> frozenset[str]:
    """Target names that are convolutions in this base's UNet. proj_in/proj_out are 1×1
    convolutions unless the UNet uses linear projections (SD1.x vs SD2/SDXL): its config.json
    says which, read here because instantiating the UNet would import diffusers (seconds).
    A base that cannot be read counts them as convolutions; DoRA's `apply` checks the real
    modules again before training."""
    from ..models import ModelError, resolve

    try:
        cfg = json.loads((resolve(model) / "unet" / "config.json").read_text(encoding="utf-8"))
    except (ModelError, OSError, ValueError):
        cfg = {}
    return _UNET_CONVS if cfg.get("use_linear_projection") else _UNET_CONVS | {"proj_in", "proj_out"}


def check_targets(params: dict) -> None:
    """An adapter method needs modules to adapt in each part it trains."""
    t = params["train"]
    if t["unet"] and not t["lora"]["unet_targets"]:
        raise ParamsProblem("train.lora.unet_targets", "'train.lora.unet_targets' is empty while train.unet is "
                            "true: list the UNet modules to adapt")
    if t["text_encoder"] and not t["lora"]["text_targets"]:
        raise ParamsProblem("train.lora.text_targets", "'train.lora.text_targets' is empty while "
                            "train.text_encoder is true: list the text-encoder modules to adapt")


def refuse_dora_convs(unet: Any, targets: list[str]) -> None:
    """diffusers cannot load DoRA on convolutions back (meta-device error at inference), and
    which targets are convolutions depends on the model, so the modules themselves are checked."""
    import torch.nn as nn

    convs = sorted({t for name, mod in unet.named_modules() if isinstance(mod, nn.Conv2d)
                    for t in targets if name == t or name.endswith("." + t)})
    if convs:
        raise ParamsProblem("train.lora.unet_targets",
                            f"train.method=dora with targets that are convolutions in this UNet {convs}: diffusers "
                            "cannot load DoRA convolutions back (meta-device error); remove them from "
                            "train.lora.unet_targets")


class Lora(Method):
    name = "lora"
    dora = False

    def check(self, params: dict) -> None:
        check_targets(params)

    def config(self, lo: dict, targets: list[str]):
        from peft import LoraConfig

        return LoraConfig(r=lo["rank"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
                          init_lora_weights="gaussian", target_modules=targets, use_dora=self.dora)

    def apply(self, parts: Any, p: dict) -> None:
        t, lo = p["train"], p["train"]["lora"]
        if t["unet"]:
            if self.dora:
                refuse_dora_convs(parts.unet, lo["unet_targets"])
            parts.unet.add_adapter(self.config(lo, lo["unet_targets"]))
        if t["text_encoder"]:
            for te in parts.text_encoders:
                te.add_adapter(self.config(lo, lo["text_targets"]))

    def save(self, out: Path, modules: dict, meta: dict, pipeline: Callable[[], Any]) -> None:
        from .. import export

        export.save_lora(out, modules, meta)

    def load(self, pipe: Any, out: Path, weight_name: str, scale: float) -> None:
        from ..models import quiet_loading

        with quiet_loading():
            pipe.load_lora_weights(str(out), weight_name=weight_name, adapter_name="subject")
        pipe.set_adapters(["subject"], adapter_weights=[scale])


class Dora(Lora):
    name = "dora"
    dora = True

    def dora_convs(self, params: dict) -> list[str]:
        """The UNet targets DoRA cannot take on this base."""
        t = params["train"]
        if not t["unet"]:
            return []
        convs = unet_convs(params["base"]["model"])
        return [x for x in t["lora"]["unet_targets"] if x.split(".")[-1] in convs]

    def adapt_defaults(self, params: dict, default_unet_targets: list[str]) -> str | None:
        """base.yaml's UNet targets without their convolutions, so that `-p train.method=dora`
        alone trains. A list the user wrote is theirs: `check` refuses its convolutions instead."""
        lo = params["train"]["lora"]
        if lo["unet_targets"] != default_unet_targets:
            return None
        dropped = self.dora_convs(params)
        if not dropped:
            return None
        lo["unet_targets"] = [x for x in lo["unet_targets"] if x not in dropped]
        return (f"train.method=dora: left {', '.join(dropped)} out of the default train.lora.unet_targets: "
                "they are convolutions in this base's UNet, which diffusers cannot load back as DoRA "
                "(set train.lora.unet_targets to choose the targets yourself)")

    def check(self, params: dict) -> None:
        super().check(params)
        convs = self.dora_convs(params)
        if convs:
            raise ParamsProblem("train.lora.unet_targets",
                                f"'train.lora.unet_targets' lists {', '.join(convs)}, convolutions in this base's "
                                "UNet, but train.method is dora and diffusers cannot load DoRA convolutions back: "
                                "remove them (or leave the key at its default: DoRA then leaves them out itself)")


LORA = Lora()
DORA = Dora()
