"""ZipLoRA: learn how to merge a subject LoRA and a style LoRA instead of adding them.

The method of Shah et al. (2023), as mkshing/ziplora-pytorch implements it (MIT; read, not
copied): every targeted layer gets ΔW = (m₁ ⊙ ΔW₁) + (m₂ ⊙ ΔW₂), one merger coefficient
per input column and LoRA, all starting at 1 (the plain sum). They are trained for ~100
steps so that the merged model predicts what LoRA₁ alone predicts on LoRA₁'s own captions
and images, and what LoRA₂ predicts on LoRA₂'s, while λ·mean|m₁ ⊙ m₂| pushes the two to
use different columns. The base weights and both LoRAs stay frozen.

No library ships ZipLoRA, so the layer arithmetic lives here, as forward hooks that add
the merged update to each targeted module's output: the modules stay the base's own.
The result is written as a `cat` merge of Aᵢ·diag(mᵢ) (dbkit.merge), so any LoRA loader
reads it and it reproduces the merged model exactly.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data, merge, train


@dataclasses.dataclass
class Hooked:
    """One targeted module, its two full updates and their mergers."""

    module: torch.nn.Module
    deltas: list[torch.Tensor]  # wᵢ·sᵢ·BᵢAᵢ, zero where LoRA i does not target the module
    mergers: list[torch.nn.Parameter]


class ZipModel:
    """The base model with merged LoRA updates added by hooks. `mode` picks what the hooks
    add: "zip" the merger-weighted sum, or an int i: LoRA i alone (the teachers)."""

    def __init__(self, parts: train.Parts, loras: list[merge.Lora], weights: list[float]) -> None:
        self.parts, self.mode = parts, "zip"
        self.layers: dict[str, Hooked] = {}
        roots = {"unet": parts.unet, "text_encoder": parts.text_encoders[0]}
        if len(parts.text_encoders) > 1:
            roots["text_encoder_2"] = parts.text_encoders[1]
        for name in dict.fromkeys(n for lo in loras for n in lo.modules):
            component, path = name.split(".", 1)
            module = _submodule(roots[component], path)
            deltas = []
            for lo, w in zip(loras, weights):
                part = lo.modules.get(name)
                deltas.append(merge.delta(*part) * w if part else torch.zeros_like(module.weight))
            mergers = [torch.nn.Parameter(torch.ones(module.weight.shape[1])) for _ in loras]
            self.layers[name] = Hooked(module, deltas, mergers)
            module.register_forward_hook(self._hook(self.layers[name]))

    def _hook(self, h: Hooked):
        def add_update(module, args, output):
            if self.mode == "zip":
                shape = (1, -1) + (1,) * (h.deltas[0].dim() - 2)
                dw = sum(m.view(shape) * d for m, d in zip(h.mergers, h.deltas))
            else:
                dw = h.deltas[self.mode]
            if isinstance(module, torch.nn.Conv2d):
                return output + F.conv2d(args[0], dw, None, module.stride, module.padding, module.dilation,
                                         module.groups)
            return output + F.linear(args[0], dw)

        return add_update

    def parameters(self) -> list[torch.nn.Parameter]:
        return [m for h in self.layers.values() for m in h.mergers]

    def similarity_penalty(self) -> torch.Tensor:
        """mean over layers of mean |m₁ ⊙ m₂|: small when the LoRAs use different columns."""
        return torch.stack([(h.mergers[0] * h.mergers[1]).abs().mean() for h in self.layers.values()]).mean()

    def predict(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prompts: list[str], res: int):
        ehs, added = train.encode_text(self.parts, prompts, None, res)
        noisy = self.parts.noise_scheduler.add_noise(latents, noise, t)
        return self.parts.unet(noisy, t, ehs, added_cond_kwargs=added).sample


def _submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    # a text encoder's LoRA keys name CLIP's `text_model` level (export.text_model_path), which
    # transformers 4's model has and 5's flattened one does not, and older files start below it
    for owner, sub in ((root, path), (root, path.removeprefix("text_model.")),
                       (getattr(root, "text_model", None), path)):
        if owner is None:
            continue
        try:
            return owner.get_submodule(sub)
        except AttributeError:
            continue
    raise merge.MergeError(f"LoRA module {path!r} is not in the base model's {type(root).__name__}: "
                           "the LoRA was trained on another base")


def encode_images(vae, files: list[str], res: int) -> torch.Tensor:
    """Latents of a LoRA's training images (centre crop at the training resolution)."""
    pixels = torch.stack([data.to_tensor(data.crop_resize(data.open_rgb(Path(f)), res)) for f in files])
    with torch.no_grad():
        return train.normalise_latents(vae, vae.encode(pixels).latent_dist.mode())


def fit(zm: ZipModel, sets: list[tuple[torch.Tensor, list[str]]], *, steps: int, lr: float, lam: float,
        seed: int, res: int, batch: int = 2) -> list[dict]:
    """Train the mergers; `sets[i]` = (latents, captions) of LoRA i's training images.
    Returns the loss log."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(zm.parameters(), lr=lr)
    sched = zm.parts.noise_scheduler
    log = []
    for step in range(steps):
        loss = lam * zm.similarity_penalty()
        parts = []
        for i, (lat, caps) in enumerate(sets):
            idx = [rng.randrange(len(caps)) for _ in range(batch)]
            x, prompts = lat[idx], [caps[k] for k in idx]
            noise = torch.randn(x.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
            zm.mode = i
            with torch.no_grad():
                target = zm.predict(x, noise, t, prompts, res)
            zm.mode = "zip"
            part = F.mse_loss(zm.predict(x, noise, t, prompts, res), target)
            parts.append(part.item())
            loss = loss + part
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append({"step": step + 1, "loss": loss.item(), "subject_mse": parts[0], "style_mse": parts[1]})
    return log


def merged_loras(zm: ZipModel, loras: list[merge.Lora]) -> list[merge.Lora]:
    """The LoRAs with each A's input columns scaled by its learned mergers: merging these by
    `cat` (weights already in the deltas: pass 1.0 … plus the original weights) gives the
    ZipLoRA model exactly."""
    out = []
    for i, lo in enumerate(loras):
        mods = {}
        for name, (a, b, s) in lo.modules.items():
            m = zm.layers[name].mergers[i].detach()
            mods[name] = (a * m.view((1, -1) + (1,) * (a.dim() - 2)), b, s)
        out.append(dataclasses.replace(lo, modules=mods))
    return out


def frozen(parts: train.Parts) -> train.Parts:
    for m in [parts.unet, parts.vae, *parts.text_encoders]:
        m.requires_grad_(False)
        m.eval()
    return parts

