"""The DreamBooth paper's real metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) from local model folders.

:mod:`dbkit.metrics` scores the toy world exactly with its oracle; this module scores real
photos the way the paper does (Ruiz et al., "DreamBooth", CVPR 2023, section 4.1):

- **DINO**: mean pairwise cosine similarity between the DINO ViT-S/16 CLS embeddings of
  generated and real subject images (subject fidelity; higher is better);
- **CLIP-I**: the same with CLIP image embeddings;
- **CLIP-T**: mean cosine similarity between each generated image's CLIP embedding and its
  prompt's CLIP text embedding (prompt fidelity; higher is better);
- **PRES**: mean DINO similarity (CLIP-I when no DINO model is set) between plain class-noun
  generations and the real subject images: how far the class drifted toward the subject
  (language drift; lower is better);
- **DIV**: mean pairwise perceptual distance between generations of one prompt, averaged over
  prompts (higher is better).

Models are real ``transformers`` classes (``CLIPModel``, ``ViTModel``/``Dinov2Model``) loaded
with ``local_files_only=True`` from the folders named in ``params: metrics.clip_model`` and
``metrics.dino_model``: nothing is ever downloaded. A missing or unreadable folder fails in
:func:`check_backends` / :func:`load_backends` with the params key, the path and the fix, before
any image is generated.

Approximations (named in every result, so they are never mistaken for the paper's numbers):

- **DIV is "lpips-vit", not LPIPS-AlexNet.** The ``lpips`` package needs torchvision backbones,
  which cannot be installed here. We keep the LPIPS formula (Zhang et al. 2018): per layer,
  unit-normalise each spatial position's channel vector, take squared differences, weight
  channels with per-channel linear weights, average over positions and sum over layers, but
  the layers are the transformer blocks of the DINO ViT (or of CLIP's vision tower when no
  DINO model is set) over patch tokens. Without ``metrics.lpips_model`` the weights are
  uniform (1/L per channel), so the distance is the mean over the L blocks of 2 - 2·cos
  between patch features, 0..4; with it, the learned weights of that file. Values are
  therefore not on LPIPS-Alex's scale; compare them only with other lpips-vit values.
- **CLIP-T scores the prompt with the identifier replaced by the class noun** ("a dog in the
  jungle", not "a sks dog in the jungle"): the rare token means nothing to CLIP and only adds
  noise. ``clip_t_identifier=True`` scores the prompt as generated.
- **Preprocessing uses PIL and numpy only**: CLIP through its PIL image processor; DINO as
  resize (shorter side to 256/224 of the crop) + centre crop + ImageNet mean/std, the
  standard evaluation transform, done without torchvision. Resampling differs slightly from
  torchvision's, so the third decimal may differ from a torchvision pipeline.
- The paper does not name its CLIP variant; :data:`PAPER_SD` is a guide, not an exact target.

Every metric comes back as ``{"value": float | None, "backend": str, "scale": str,
"better": "higher" | "lower"}``; :func:`flatten` turns a result into the flat row that
:func:`dbkit.report.metrics_markdown` shows.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .config import ConfigError

# ----------------------------------------------------------------------------- paper reference

# DreamBooth with Stable Diffusion, Table 1 of the paper (mean over its 30 subjects × 25 prompts
# × 4 images). Shown next to the user's numbers; real photos score DINO 0.774, CLIP-I 0.885.
PAPER_SD: dict[str, float] = {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}
PAPER_SOURCE = "Ruiz et al., DreamBooth (CVPR 2023), Table 1, DreamBooth (Stable Diffusion)"

COSINE = "cosine similarity, -1..1"
METRICS = ("dino", "clip_i", "clip_t", "pres", "div", "div_class")

# ----------------------------------------------------------------------------- benchmark prompts

# Copied from the DreamBooth dataset (github.com/google/dreambooth, dataset/prompts_and_classes.txt),
# where each reads 'a {0} {1} …'.format(unique_token, class_token); here {0} is the whole subject
# phrase ("sks dog"), so the same templates also serve trigger-word and class-noun prompts.
RECONTEXT_PROMPTS: tuple[str, ...] = (
    "a {0} in the jungle",
    "a {0} in the snow",
    "a {0} on the beach",
    "a {0} on a cobblestone street",
    "a {0} on top of pink fabric",
    "a {0} on top of a wooden floor",
    "a {0} with a city in the background",
    "a {0} with a mountain in the background",
    "a {0} with a blue house in the background",
    "a {0} on top of a purple rug in a forest",
    "a {0} with a wheat field in the background",
    "a {0} with a tree and autumn leaves in the background",
    "a {0} with the Eiffel Tower in the background",
    "a {0} floating on top of water",
    "a {0} floating in an ocean of milk",
    "a {0} on top of green grass with sunflowers around it",
    "a {0} on top of a mirror",
    "a {0} on top of the sidewalk in a crowded street",
    "a {0} on top of a dirt road",
    "a {0} on top of a white rug",
)
ACCESSORY_PROMPTS: tuple[str, ...] = (
    "a {0} wearing a red hat",
    "a {0} wearing a santa hat",
    "a {0} wearing a rainbow scarf",
    "a {0} wearing a black top hat and a monocle",
    "a {0} in a chef outfit",
    "a {0} in a firefighter outfit",
    "a {0} in a police outfit",
    "a {0} wearing pink glasses",
    "a {0} wearing a yellow shirt",
    "a {0} in a purple wizard outfit",
)
PROPERTY_PROMPTS: tuple[str, ...] = (
    "a red {0}",
    "a purple {0}",
    "a shiny {0}",
    "a wet {0}",
    "a cube shaped {0}",
)
# Objects: 20 recontextualisations + 5 properties. Live subjects: the first 10 recontextualisations,
# 10 accessories (outfits make sense only for animals) + the same 5 properties.
OBJECT_PROMPTS: tuple[str, ...] = RECONTEXT_PROMPTS + PROPERTY_PROMPTS
LIVE_PROMPTS: tuple[str, ...] = RECONTEXT_PROMPTS[:10] + ACCESSORY_PROMPTS + PROPERTY_PROMPTS

# The dataset's live subjects are dogs and cats; other animals are guessed from the class noun.
# ("stuffed animal", the plushies' class, stays an object, as in the dataset.)
LIVE_CLASSES = frozenset({"dog", "cat", "puppy", "kitten", "bird", "horse", "rabbit", "hamster", "person", "man",
                          "woman", "boy", "girl", "child", "baby"})


def dreambooth_prompts(subject_phrase: str, live: bool) -> list[str]:
    """The paper's 25 evaluation prompts for one subject ("sks dog"): the live or object set."""
    return [t.format(subject_phrase) for t in (LIVE_PROMPTS if live else OBJECT_PROMPTS)]


def is_live(class_noun: str) -> bool:
    """Whether a class noun names a live subject (accessory prompts) rather than an object."""
    words = class_noun.lower().split()
    return bool(words) and (words[-1] in LIVE_CLASSES or words[-1].removesuffix("s") in LIVE_CLASSES)


# ----------------------------------------------------------------------------- errors and paths

class BackendError(ConfigError):
    """A metrics model folder or file is missing or unreadable; the message names the params key."""


# What to download for each key; the message tells the user to do it on a machine with network.
_HUB_IDS = {"clip_model": "openai/clip-vit-large-patch14", "dino_model": "facebook/dino-vits16"}


def _howto(key: str) -> str:
    if key == "lpips_model":
        return ("metrics.lpips_model is optional: leave it empty (\"\") for uniform weights, or point it at a "
                "safetensors file with one weight vector per ViT block (lin0, lin1, …)")
    hub = _HUB_IDS[key]
    local = f"models/{hub.split('/')[1]}"
    return (f"download the model on a machine with network (`huggingface-cli download {hub} --local-dir {local}`), "
            f"copy the folder here and set metrics.{key}: {local}")


def _fail(key: str, path: str | Path, problem: str) -> BackendError:
    return BackendError(f"metrics.{key}: {problem} (path {str(path)!r}, relative to {Path.cwd()}): {_howto(key)}")


def _metrics_section(p: dict) -> dict:
    """Accept the resolved params (``exp.params``) or just their ``metrics`` section."""
    return p["metrics"] if isinstance(p.get("metrics"), dict) else p


def _model_dir(key: str, value: str) -> Path:
    """The folder of a transformers model, checked before anything is loaded from it."""
    if not value:
        raise _fail(key, value, "is empty, but the real metrics need a local model folder")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise _fail(key, value, "folder does not exist" if not path.exists() else "is not a folder")
    if not (path / "config.json").is_file():
        raise _fail(key, value, "folder has no config.json, so it is not a transformers model folder")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise _fail(key, value, "folder has no weights (*.safetensors or *.bin)")
    return path


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- image helpers

_BATCH = 16  # images per forward pass: bounded memory for CLIP ViT-L/14 on a small GPU

# The ImageNet statistics DINO and DINOv2 were trained with.
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


def _imagenet_pixels(images: Sequence[Image.Image], crop: int) -> np.ndarray:
    """Resize (shorter side to crop·256/224) + centre crop + ImageNet normalise, as (N, 3, crop, crop).

    The usual DINO evaluation transform (Resize(256), CenterCrop(224)), in PIL so no torchvision.
    """
    short = max(crop, round(crop * 256 / 224))
    out = []
    for im in _rgb(images):
        w, h = im.size
        # the long side truncated, as torchvision's Resize and transformers compute it: rounding
        # it made some sizes one pixel longer and shifted their centre crop
        nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - crop) // 2, (nh - crop) // 2
        arr = np.asarray(im.crop((left, top, left + crop, top + crop)), np.float32) / 255.0
        out.append(((arr - _IMAGENET_MEAN) / _IMAGENET_STD).transpose(2, 0, 1))
    return np.stack(out)


def _unit(x: Any) -> Any:
    import torch

    return torch.nn.functional.normalize(x.float(), dim=-1)


# ----------------------------------------------------------------------------- backbones


@dataclass(frozen=True, eq=False)
class ClipBackend:
    """A CLIP model, its PIL image processor and tokenizer, loaded from one local folder."""

    model: Any
    processor: Any
    tokenizer: Any
    name: str  # "clip:<folder name>"
    device: str

    def run(self, images: Sequence[Image.Image], hidden: bool = False) -> tuple[Any, list[Any] | None]:
        """(unit image embeddings (N, D), patch features per vision block (N, P, C) or None)."""
        import torch

        embs, layers = [], []
        for i in range(0, len(images), _BATCH):
            px = self.processor(images=_rgb(images[i:i + _BATCH]), return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                # vision tower + projection = get_image_features, spelled out because that returns a bare
                # tensor in transformers 4 and an output object in 5; here both give the hidden states
                out = self.model.vision_model(pixel_values=px.to(self.device), output_hidden_states=hidden)
                emb = self.model.visual_projection(out.pooler_output)
            embs.append(_unit(emb).cpu())
            if hidden:
                # hidden_states[0] is the embedding layer; LPIPS uses the blocks' outputs, CLS dropped
                layers.append([h[:, 1:].float().cpu() for h in out.hidden_states[1:]])
        return torch.cat(embs), ([torch.cat(ls) for ls in zip(*layers)] if hidden else None)

    def text(self, texts: Sequence[str]) -> Any:
        """Unit text embeddings (N, D)."""
        import torch

        limit = min(int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings))
        embs = []
        for i in range(0, len(texts), _BATCH):
            tok = self.tokenizer(list(texts[i:i + _BATCH]), padding=True, truncation=True, max_length=limit,
                                 return_tensors="pt")
            with torch.inference_mode():
                out = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                            attention_mask=tok["attention_mask"].to(self.device))
                emb = self.model.text_projection(out.pooler_output)
            embs.append(_unit(emb).cpu())
        return torch.cat(embs)


@dataclass(frozen=True, eq=False)
class DinoBackend:
    """A DINO ViT (``ViTModel``) or DINOv2 (``Dinov2Model``) loaded from one local folder."""

    model: Any
    crop: int
    skip_tokens: int  # CLS (+ DINOv2 register tokens): not spatial positions, so not in LPIPS
    forward_kwargs: dict
    name: str  # "dino:<folder name>"
    device: str

    def run(self, images: Sequence[Image.Image], hidden: bool = False) -> tuple[Any, list[Any] | None]:
        """(unit CLS embeddings (N, D), patch features per block (N, P, C) or None)."""
        import torch

        embs, layers = [], []
        for i in range(0, len(images), _BATCH):
            px = torch.from_numpy(_imagenet_pixels(images[i:i + _BATCH], self.crop)).to(self.device)
            with torch.inference_mode():
                out = self.model(pixel_values=px, output_hidden_states=hidden, **self.forward_kwargs)
            # the CLS token after the final norm: DINO's image embedding (the ViT pooler is untrained)
            embs.append(_unit(out.last_hidden_state[:, 0]).cpu())
            if hidden:
                layers.append([h[:, self.skip_tokens:].float().cpu() for h in out.hidden_states[1:]])
        return torch.cat(embs), ([torch.cat(ls) for ls in zip(*layers)] if hidden else None)


@functools.lru_cache(maxsize=4)
def _load_clip(path: str, device: str) -> ClipBackend:
    try:
        import transformers
        from transformers import CLIPModel, CLIPTokenizer

        # The PIL backend explicitly: transformers 5 falls back to it anyway without torchvision, and
        # pinning it keeps numbers identical on machines that do have torchvision.
        processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        processor = processor_cls.from_pretrained(path, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # any load failure (bad json, wrong model type, truncated weights) → one clear error
        raise _fail("clip_model", path, f"cannot load a CLIP model, image processor and tokenizer "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    return ClipBackend(model, processor, tokenizer, f"clip:{Path(path).resolve().name}", device)


_DINO_TYPES = ("vit", "dinov2", "dinov2_with_registers")


def _crop_size(path: Path, image_size: int) -> int:
    """The evaluation crop: the preprocessor's crop/size when it says one, else the model's image size.

    DINOv2 configs say 518 (the size its position table was trained at) but evaluate at 224.
    """
    try:
        pre = json.loads((path / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        return image_size
    for key in ("crop_size", "size"):
        v = pre.get(key)
        if isinstance(v, int):
            return v
        if isinstance(v, dict) and isinstance(v.get("height"), int):
            return v["height"]
    return image_size


@functools.lru_cache(maxsize=4)
def _load_dino(path: str, device: str) -> DinoBackend:
    try:
        from transformers import AutoConfig, AutoModel, ViTModel

        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise _fail("dino_model", path, f"cannot read the model config ({type(e).__name__}: {e})") from e
    if cfg.model_type not in _DINO_TYPES:
        raise _fail("dino_model", path, f"is a {cfg.model_type!r} model, not a DINO ViT "
                    f"(model_type one of {', '.join(_DINO_TYPES)})")
    try:
        if cfg.model_type == "vit":  # no pooler: DINO checkpoints have none, and it would be random
            model = ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
        else:
            model = AutoModel.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise _fail("dino_model", path, f"cannot load the weights ({type(e).__name__}: {e})") from e
    crop = _crop_size(Path(path), int(cfg.image_size))
    kwargs = {}
    if crop != cfg.image_size and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
        kwargs["interpolate_pos_encoding"] = True  # ViT needs it at a size other than its config's
    skip = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    return DinoBackend(model.to(device).eval(), crop, skip, kwargs, f"dino:{Path(path).resolve().name}", device)


def load_clip(path: str | Path) -> ClipBackend:
    """CLIP from a local folder (``metrics.clip_model``); cached, so repeated calls are free."""
    return _load_clip(str(_model_dir("clip_model", str(path))), _device())


def load_dino(path: str | Path) -> DinoBackend:
    """DINO ViT / DINOv2 from a local folder (``metrics.dino_model``); cached."""
    return _load_dino(str(_model_dir("dino_model", str(path))), _device())


def clear_cache() -> None:
    """Forget loaded models (free their memory)."""
    _load_clip.cache_clear()
    _load_dino.cache_clear()


# ----------------------------------------------------------------------------- LPIPS over ViT blocks


@dataclass(frozen=True, eq=False)
class LpipsVit:
    """LPIPS's formula over a ViT's blocks (see the module docstring); ``distance`` is 0 for equal images."""

    backbone: ClipBackend | DinoBackend
    layers: tuple[int, ...]  # indices into the backbone's block outputs (0 = first block)
    weights: tuple[Any, ...]  # one non-negative (C,) tensor per layer
    name: str
    scale: str

    def features(self, images: Sequence[Image.Image]) -> list[Any]:
        """Per chosen layer, unit-normalised patch features (N, P, C)."""
        _, hidden = self.backbone.run(images, hidden=True)
        assert hidden is not None
        return [_unit(hidden[i]) for i in self.layers]

    def distance(self, feats: list[Any], i: int, j: int) -> float:
        """LPIPS distance of images i and j: Σ_layers mean_positions Σ_c w_c (f̂_i − f̂_j)²."""
        return float(sum(((f[i] - f[j]) ** 2 @ w).mean() for f, w in zip(feats, self.weights)))

    def mean_pairwise(self, images: Sequence[Image.Image]) -> float | None:
        """Mean distance over all pairs of ``images``; None for fewer than two."""
        if len(images) < 2:
            return None
        feats = self.features(images)
        return float(np.mean([self.distance(feats, i, j) for i, j in itertools.combinations(range(len(images)), 2)]))


def _block_channels(backbone: ClipBackend | DinoBackend) -> tuple[int, int]:
    cfg = backbone.model.config
    cfg = getattr(cfg, "vision_config", cfg)
    return int(cfg.num_hidden_layers), int(cfg.hidden_size)


_LIN_KEY = re.compile(r"lin(\d+)(?:\.model\.1\.weight)?")


def load_lpips(backbone: ClipBackend | DinoBackend, weights_file: str = "") -> LpipsVit:
    """LPIPS-ViT on ``backbone``: uniform weights, or the per-layer vectors of a safetensors file.

    The file holds ``lin0``, ``lin1``, … (each C values; LPIPS's own (1, C, 1, 1) shape is fine),
    one per layer, and optionally ``layers`` (block indices, 0-based) when not every block is used.
    """
    import torch

    n_blocks, channels = _block_channels(backbone)
    if not weights_file:
        # uniform 1/L: the distance is the mean over blocks of 2 − 2·cos, 0..4, whatever the depth
        w = torch.full((channels,), 1.0 / n_blocks)
        return LpipsVit(backbone, tuple(range(n_blocks)), (w,) * n_blocks, f"lpips-vit:{backbone.name}:uniform",
                        "lpips-vit distance, 0..4 (uniform weights: mean over ViT blocks of 2 - 2·cos)")
    path = Path(weights_file).expanduser()
    if not path.is_file():
        raise _fail("lpips_model", weights_file, "file does not exist")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    except Exception as e:
        raise _fail("lpips_model", weights_file, f"is not a readable safetensors file ({type(e).__name__}: {e})") from e
    # "lin3", or LPIPS's own key "lin3.model.1.weight"; ordered by the layer number
    lins = sorted((k for k in tensors if _LIN_KEY.fullmatch(k)), key=lambda k: int(_LIN_KEY.fullmatch(k)[1]))
    layers = tuple(int(x) for x in tensors["layers"].flatten().tolist()) if "layers" in tensors else tuple(
        range(n_blocks))
    weights = tuple(tensors[k].flatten().float() for k in lins)
    problem = ""
    if len(weights) != len(layers):
        problem = f"has {len(weights)} lin* vectors for {len(layers)} layers"
    elif any(not 0 <= i < n_blocks for i in layers):
        problem = f"names layers {layers}, but the backbone has blocks 0..{n_blocks - 1}"
    elif any(w.numel() != channels for w in weights):
        problem = f"has vectors of sizes {[w.numel() for w in weights]}, but the backbone has {channels} channels"
    elif any(not torch.isfinite(w).all() or (w < 0).any() for w in weights):
        problem = "has negative or non-finite weights (LPIPS weights are ≥ 0)"
    if problem:
        raise _fail("lpips_model", weights_file, f"{problem} (backbone {backbone.name})")
    return LpipsVit(backbone, layers, weights, f"lpips-vit:{backbone.name}:{path.name}",
                    "lpips-vit distance, ≥ 0 (learned per-channel weights)")


# ----------------------------------------------------------------------------- loading all


@dataclass(frozen=True, eq=False)
class Backends:
    """Everything :func:`evaluate_real` needs: CLIP, DINO (optional) and LPIPS-ViT on DINO or CLIP."""

    clip: ClipBackend
    dino: DinoBackend | None
    lpips: LpipsVit


def load_backends(p: dict) -> Backends:
    """Load (or fetch from the cache) the models named in params ``metrics.*``; BackendError if unusable."""
    m = _metrics_section(p)
    clip = load_clip(m.get("clip_model", ""))
    dino = load_dino(m["dino_model"]) if m.get("dino_model") else None
    return Backends(clip, dino, load_lpips(dino or clip, m.get("lpips_model", "")))


def check_backends(p: dict) -> None:
    """Fail now, not after training, if ``metrics.backend: clip`` names models that cannot be loaded.

    Loads them (cached, so the evaluation later reuses them). Does nothing for the oracle backend,
    which needs no model.
    """
    if _metrics_section(p).get("backend", "clip") == "clip":
        load_backends(p)


# ----------------------------------------------------------------------------- metrics


def _entry(value: float | None, backend: str, scale: str = COSINE, better: str = "higher", **extra: Any) -> dict:
    v = None if value is None or not math.isfinite(value) else round(float(value), 6)
    return {"value": v, "backend": backend, "scale": scale, "better": better, **extra}


def _mean_cos(a: Any, b: Any) -> float:
    """Mean over all pairs (rows of a × rows of b) of the cosine of unit vectors."""
    return float((a @ b.T).mean())


def image_similarity(backbone: ClipBackend | DinoBackend, generated: Sequence[Image.Image],
                     real: Sequence[Image.Image]) -> dict:
    """CLIP-I (CLIP backbone) or DINO (DINO backbone): mean pairwise cosine, generated × real."""
    if not generated or not real:
        raise ValueError("image_similarity needs at least one generated and one real image")
    g, _ = backbone.run(generated)
    r, _ = backbone.run(real)
    return _entry(_mean_cos(g, r), backbone.name)


def text_similarity(clip: ClipBackend, images: Sequence[Image.Image], texts: Sequence[str]) -> dict:
    """CLIP-T: mean cosine of each image with its own text (``texts[i]`` describes ``images[i]``)."""
    if len(images) != len(texts) or not images:
        raise ValueError(f"text_similarity needs one text per image, got {len(images)} images, {len(texts)} texts")
    im, _ = clip.run(images)
    return _entry(float((im * clip.text(texts)).sum(-1).mean()), clip.name)


def diversity(lpips: LpipsVit, groups: Sequence[Sequence[Image.Image]]) -> dict:
    """DIV: mean over groups (one prompt's generations) of the mean pairwise LPIPS-ViT distance."""
    per = [d for d in (lpips.mean_pairwise(g) for g in groups) if d is not None]
    return _entry(float(np.mean(per)) if per else None, lpips.name, lpips.scale)


def evaluate_real(generate: Callable[[list[str], list[int]], list[Image.Image]], p: dict,
                  real_images: list[Image.Image], subject_phrase: str, class_noun: str, *, seeds: list[int],
                  live: bool | None = None, prompts: list[str] | None = None, class_prompts: list[str] | None = None,
                  clip_t_identifier: bool = False) -> dict:
    """The paper's metrics for one model, mirroring :func:`dbkit.metrics.evaluate`.

    ``generate(prompts, seeds) -> images`` in prompt-major order (all seeds of prompt 0 first).
    Prompts default to the paper's 25 (``live`` guessed from the class noun when None); PRES and
    ``div_class`` use ``class_prompts`` (default ``["a {class_noun}"]``). Models are loaded before
    anything is generated, so a bad path fails in seconds. Returns ``{metric: {"value", "backend",
    "scale", "better"}}`` for dino, clip_i, clip_t, pres, div, div_class, plus ``n_images``,
    ``prompt_set`` and ``paper_sd``.
    """
    if not real_images:
        raise ValueError("evaluate_real needs the real subject images (got none)")
    if not seeds:
        raise ValueError("evaluate_real needs at least one seed")
    b = load_backends(p)
    if live is None:
        live = is_live(class_noun)
    prompt_set = "custom" if prompts is not None else ("dreambooth-live" if live else "dreambooth-object")
    prompts = list(prompts) if prompts is not None else dreambooth_prompts(subject_phrase, live)
    class_prompts = list(class_prompts) if class_prompts is not None else [f"a {class_noun}"]
    n = len(seeds)

    def groups_of(texts: list[str]) -> list[list[Image.Image]]:
        images = list(generate(texts, seeds))
        if len(images) != len(texts) * n:
            raise ValueError(f"generate returned {len(images)} images for {len(texts)} prompts × {n} seeds")
        return [images[k * n:(k + 1) * n] for k in range(len(texts))]

    gen_groups = groups_of(prompts)
    class_groups = groups_of(class_prompts)
    generated = [im for g in gen_groups for im in g]
    klass = [im for g in class_groups for im in g]

    # the text CLIP scores: the identifier means nothing to CLIP, so by default it sees the class noun
    texts = prompts if clip_t_identifier else [t.replace(subject_phrase, class_noun) for t in prompts]
    per_image_texts = [t for t in texts for _ in seeds]

    fidelity = b.dino or b.clip  # PRES falls back to CLIP-I when no DINO model is set
    dino = (image_similarity(b.dino, generated, real_images) if b.dino is not None
            else _entry(None, "none: metrics.dino_model is empty"))
    pres = image_similarity(fidelity, klass, real_images)
    pres["better"] = "lower"
    return {
        "dino": dino,
        "clip_i": image_similarity(b.clip, generated, real_images),
        "clip_t": text_similarity(b.clip, generated, per_image_texts),
        "pres": pres,
        "div": diversity(b.lpips, gen_groups),
        "div_class": diversity(b.lpips, class_groups),
        "n_images": len(generated) + len(klass),
        "prompt_set": prompt_set,
        "clip_t_text": "prompt" if clip_t_identifier else "prompt with the subject phrase replaced by the class noun",
        "paper_sd": dict(PAPER_SD),
    }


def flatten(result: dict) -> dict:
    """A flat report row ``{metric: value, …, "backend": "clip:…, dino:…, lpips-vit:…", "n_images": n}``."""
    row: dict[str, Any] = {k: result[k]["value"] for k in METRICS if k in result}
    backends = dict.fromkeys(result[k]["backend"] for k in METRICS if k in result and result[k]["value"] is not None)
    row["backend"] = ", ".join(backends)
    if "n_images" in result:
        row["n_images"] = result["n_images"]
    return row
