"""LoKr (LyCORIS' Kronecker-product adapter) through peft's LoKrConfig, UNet only.

ΔW = scale · (w1 ⊗ w2) per target, each factor a full matrix or a rank-`train.lora.rank`
product; `train.lokr.factor` picks how each dimension splits (-1: as square as it goes).
It reuses `train.lora`'s rank, alpha and targets. Written twice:
- diffusers' layout (`pytorch_lora_weights.safetensors`: `unet.<module>.lokr_w1` …, the
  LoKrConfig in its `lora_adapter_metadata` header), loaded with
  `pipe.unet.load_lora_adapter(folder, prefix="unet")` — diffusers' pipeline-level
  `load_lora_weights` takes LoRA keys only for SD/SDXL;
- LyCORIS' kohya layout (`lora_kohya.safetensors`: `lora_unet_<module>.lokr_w1` …), which the
  A1111/Forge WebUI and ComfyUI read. Those loaders scale by alpha/rank only when a factor is
  rank-decomposed and by 1 otherwise, where peft always scales by alpha/rank: a module whose
  factors are both full gets peft's scale baked into `lokr_w1` and no alpha.
Text encoders are refused: diffusers loads no LoKr into them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import Method, ParamsProblem
from .lora import check_targets

_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class Lokr(Method):
    name = "lokr"

    def check(self, params: dict) -> None:
        t = params["train"]
        if t["text_encoder"]:
            raise ParamsProblem("train.method", "train.method is lokr, which trains the UNet only "
                                "(diffusers loads no LoKr into a text encoder): set train.text_encoder: false")
        check_targets(params)
        if t["lora"]["dropout"]:
            raise ParamsProblem("train.lora.dropout", "'train.lora.dropout' is LoRA's dropout, which LoKr does "
                                "not have: set it to 0 with train.method: lokr")
        if not t["unet"]:
            raise ParamsProblem("train.unet", "train.method is lokr but train.unet is false: LoKr adapts the "
                                "UNet; set train.unet: true")

    def config(self, p: dict):
        from peft import LoKrConfig

        lo, lk = p["train"]["lora"], p["train"]["lokr"]
        return LoKrConfig(r=lo["rank"], alpha=lo["alpha"], target_modules=lo["unet_targets"],
                          decompose_factor=lk["factor"], decompose_both=lk["decompose_both"])

    def apply(self, parts: Any, p: dict) -> None:
        parts.unet.add_adapter(self.config(p))

    def save(self, out: Path, modules: dict, meta: dict, pipeline: Callable[[], Any]) -> None:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        from .. import export

        unet = modules["unet"]
        sd = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
        cfg = unet.peft_config["default"].to_dict()
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        header = {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in cfg.items()}),
                  "dbkit": json.dumps(meta)}
        save_file({f"unet.{k}": v for k, v in sd.items()}, out / export.LORA_FILE, metadata=header)
        xl = "text_encoder_2" in modules
        save_file(kohya_state_dict(sd, float(cfg["alpha"]), int(cfg["r"]), xl), out / export.KOHYA_FILE,
                  metadata=export.kohya_metadata(meta) | {
                      "ss_network_module": "lycoris.kohya",
                      "ss_network_args": json.dumps({"algo": "lokr", "factor": str(cfg["decompose_factor"]),
                                                     "decompose_both": str(cfg["decompose_both"])})})

    def load(self, pipe: Any, out: Path, weight_name: str, scale: float) -> None:
        from ..models import quiet_loading

        with quiet_loading():
            pipe.unet.load_lora_adapter(str(out), weight_name=weight_name, prefix="unet", adapter_name="subject")
        pipe.set_adapters(["subject"], adapter_weights=[scale])


def kohya_state_dict(sd: dict, alpha: float, rank: int, xl: bool) -> dict:
    """peft's LoKr tensors under LyCORIS' kohya names (see the module docstring for alpha)."""
    import torch

    from .. import export

    modules: dict[str, dict] = {}
    for key, v in sd.items():
        module, _, kind = key.rpartition(".")
        if kind not in _FACTORS:
            raise ValueError(f"unet.{key}: no LyCORIS equivalent for this LoKr tensor")
        modules.setdefault(module, {})[kind] = v
    out = {}
    for module, factors in modules.items():
        name = export.kohya_module_name("unet", module, xl)
        if "lokr_w1" in factors and "lokr_w2" in factors:
            factors["lokr_w1"] = factors["lokr_w1"] * (alpha / rank)
        else:
            out[f"{name}.alpha"] = torch.tensor(alpha)
        out |= {f"{name}.{kind}": v for kind, v in factors.items()}
    return out


LOKR = Lokr()
