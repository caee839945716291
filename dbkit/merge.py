"""Merging LoRA files into one, by the methods the field uses, on the tensors themselves.

Every method works on the saved files (diffusers layout, PEFT naming), so a merge needs no
model in memory and any LoRA a run or a user made can take part. What each method computes,
per targeted module, for LoRAs i with weight wᵢ, scale sᵢ = alphaᵢ / rankᵢ and update
ΔWᵢ = sᵢ·Bᵢ·Aᵢ:

- `cat`: A = [w₁s₁A₁; w₂s₂A₂], B = [B₁ B₂] — exactly Σ wᵢΔWᵢ, rank Σ rankᵢ. This is also
  the file a runtime `weighted` sum (diffusers `set_adapters`) or a `fused` one writes:
  the same function, exactly.
- `svd`: the true sum Σ wᵢΔWᵢ truncated to `svd_rank` by SVD (exact at full rank).
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: PEFT's
  `add_weighted_adapter` semantics — A and B combined separately with √(wᵢsᵢ) each (the
  sign on A), then PEFT's merge_utils (TIES trimming/sign election, DARE drop-and-rescale,
  magnitude pruning) applied to the A's and to the B's. The product of sums is NOT the sum
  of products: these are approximations of Σ wᵢΔWᵢ and need equal ranks.
- `ziplora` (dbkit/ziplora.py) learns per-column mergers mᵢ; its result is written as a
  `cat` of Aᵢ·diag(mᵢ).

We apply PEFT's merge_utils to the tensors instead of calling `add_weighted_adapter` on a
model: that needs both adapters injected into a loaded model per component, while the
files already hold everything. tests/test_merge.py checks every method against
`add_weighted_adapter` itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

TENSOR_METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
RUNTIME_METHODS = ("weighted", "fused")
METHODS = RUNTIME_METHODS + TENSOR_METHODS + ("ziplora",)


class MergeError(ValueError):
    """A LoRA that cannot take part in a merge; the message names the file and the fix."""


@dataclasses.dataclass
class Lora:
    """One LoRA file: per module (`<component>.<module path>`) its A, B and scale, plus the
    per-component LoraConfig (as the file's adapter metadata records it)."""

    path: Path
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    configs: dict[str, dict]
    meta: dict  # dbkit's training metadata, {} for a file from elsewhere

    def rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.modules.values())


def _scale(cfg: dict, module: str, rank: int) -> float:
    # rank_pattern/alpha_pattern keys are module-name suffixes (PEFT matches them so)
    alpha = next((v for k, v in (cfg.get("alpha_pattern") or {}).items() if module.endswith(k)), cfg["lora_alpha"])
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def read_lora(path: Path) -> Lora:
    """A diffusers-layout LoRA file (as dbkit and diffusers' scripts save them, with the
    adapter config in the header). A kohya file or a DoRA is refused with what to do."""
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise MergeError(f"{path}: no such LoRA file; name a run folder, its output/ folder or a .safetensors file")
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    if "lora_adapter_metadata" not in header:
        raise MergeError(f"{path}: no adapter config in the file's header (a kohya-layout or older file?); merge "
                         "the diffusers-layout pytorch_lora_weights.safetensors a dbkit or diffusers run writes")
    flat = json.loads(header["lora_adapter_metadata"])
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    if any(c.get("use_dora") for c in configs.values()):
        raise MergeError(f"{path}: a DoRA adapter; its magnitude vectors have no merge rule here — merge LoRAs")
    tensors = load_file(path)
    modules = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        component, module = name.split(".", 1)
        if component.startswith("text_encoder") and not module.startswith("text_model."):
            # a file written under transformers 5 before export.text_model_path: one name per module
            name = f"{component}.text_model.{module}"
        modules[name] = (a.float(), b.float(), _scale(configs[component], module, a.shape[0]))
    return Lora(path, modules, configs, json.loads(header.get("dbkit", "{}")))


def delta(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """ΔW = scale·B·A, shaped like the module's weight (a convolution's too)."""
    d = scale * (b.flatten(1) @ a.flatten(1))
    return d.reshape(b.shape[0], *a.shape[1:]) if a.dim() == 4 else d


def _cat(parts: list[tuple[torch.Tensor, torch.Tensor, float] | None], weights: list[float], rank: int):
    """A and B of Σ wᵢsᵢBᵢAᵢ, zero-padded to `rank` where a LoRA does not target the module."""
    present = [(p, w) for p, w in zip(parts, weights) if p is not None]
    a0, b0, _ = present[0][0]
    a = torch.zeros(rank, *a0.shape[1:])
    b = torch.zeros(b0.shape[0], rank, *b0.shape[2:])
    at = 0
    for p, w in zip(parts, weights):
        if p is None:
            continue
        pa, pb, s = p
        a[at : at + pa.shape[0]] = w * s * pa
        b[:, at : at + pa.shape[0]] = pb
        at += pa.shape[0]
    return a, b


def _svd(parts, weights, rank: int):
    total = sum(w * delta(*p) for p, w in zip(parts, weights) if p is not None)
    a_shape = next(p for p in parts if p is not None)[0].shape
    u, s, vh = torch.linalg.svd(total.flatten(1), full_matrices=False)
    k = min(rank, s.shape[0])
    b = (u[:, :k] * s[:k])
    a = vh[:k]
    if k < rank:  # a sum of rank below `rank`: pad, so every module has the file's rank
        a = torch.cat([a, torch.zeros(rank - k, a.shape[1])])
        b = torch.cat([b, torch.zeros(b.shape[0], rank - k)], dim=1)
    if len(a_shape) == 4:
        return a.reshape(rank, *a_shape[1:]), b.reshape(b.shape[0], rank, 1, 1)
    return a, b


def _task_arithmetic(method: str, parts, weights, density: float, majority_sign: str):
    from peft.utils import merge_utils

    present = [(p, w) for p, w in zip(parts, weights) if p is not None]
    wa, wb = [], []
    for (_, _, s), w in present:
        ws = w * s
        wa.append(math.copysign(math.sqrt(abs(ws)), ws))  # the sign on one side only
        wb.append(math.sqrt(abs(ws)))
    out = []
    for side, ws in ((0, wa), (1, wb)):
        tensors = [p[side] for p, _ in present]
        wt = torch.tensor(ws)
        if method == "linear":
            out.append(merge_utils.task_arithmetic(tensors, wt))
        elif method == "ties":
            out.append(merge_utils.ties(tensors, wt, density, majority_sign))
        elif method == "dare_linear":
            out.append(merge_utils.dare_linear(tensors, wt, density))
        elif method == "dare_ties":
            out.append(merge_utils.dare_ties(tensors, wt, density, majority_sign))
        else:
            out.append(merge_utils.magnitude_prune(tensors, wt, density))
    return out[0], out[1]


@dataclasses.dataclass
class Merged:
    """A merge's result: per component, PEFT-named tensors and the LoraConfig to save them with."""

    state_dicts: dict[str, tuple[dict[str, torch.Tensor], dict]]
    rank: int


def output_rank(method: str, loras: list[Lora], svd_rank: int = 0) -> int:
    ranks = [lo.rank() for lo in loras]
    if method in ("cat", "weighted", "fused", "ziplora"):
        return sum(ranks)
    if method == "svd":
        return svd_rank or max(ranks)
    if len(set(ranks)) != 1:
        raise MergeError(f"merge.methods: {method} combines A and B matrices entry by entry, so it needs LoRAs of "
                         f"one rank; got ranks {ranks} ({', '.join(str(lo.path) for lo in loras)}); use cat or svd")
    return ranks[0]


def merge(loras: list[Lora], weights: list[float], method: str, *, density: float = 0.5,
          majority_sign: str = "total", svd_rank: int = 0, seed: int = 0) -> Merged:
    """Merge LoRA files by one tensor method (`weighted`/`fused` write their exact
    equivalent, `cat`). `seed` fixes DARE's random drops."""
    if method not in METHODS or method == "ziplora":
        raise MergeError(f"merge.methods: {method!r} is not a tensor merge; choose from {', '.join(METHODS[:-1])}")
    rank = output_rank(method, loras, svd_rank)
    names = list(dict.fromkeys(n for lo in loras for n in lo.modules))
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        parts = [lo.modules.get(name) for lo in loras]
        if method in ("cat", "weighted", "fused"):
            a, b = _cat(parts, weights, rank)
        elif method == "svd":
            a, b = _svd(parts, weights, rank)
        elif method.startswith("dare"):
            # DARE drops at random; one generator per module makes a merge independent of the
            # order modules are visited in (PEFT uses the global generator in model order)
            with torch.random.fork_rng():
                torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                a, b = _task_arithmetic(method, parts, weights, density, majority_sign)
        else:
            a, b = _task_arithmetic(method, parts, weights, density, majority_sign)
        component, module = name.split(".", 1)
        tensors.setdefault(component, {})[f"{module}.lora_A.weight"] = a.contiguous()
        tensors[component][f"{module}.lora_B.weight"] = b.contiguous()
    return Merged({c: (sd, merged_config(loras, c, rank)) for c, sd in tensors.items()}, rank)


def merged_config(loras: list[Lora], component: str, rank: int) -> dict:
    """The first LoRA's config for one component, with the merge's rank, alpha = rank (every
    scale is folded into the tensors) and the union of the targets."""
    cfgs = [lo.configs[component] for lo in loras if component in lo.configs]
    targets = sorted({t for c in cfgs for t in (c.get("target_modules") or [])})
    return cfgs[0] | {"r": rank, "lora_alpha": rank, "target_modules": targets, "rank_pattern": {},
                      "alpha_pattern": {}, "use_rslora": False, "lora_dropout": 0.0}
