"""Model-backed caption sources for real photos, each loaded from a local folder.

- ``wd14``: a WD14-style ONNX tagger (SmilingWolf's wd-v1-4 layout: ``model.onnx`` and
  ``selected_tags.csv``) run by onnxruntime: the photo padded square on white, resized to the
  model's input size, fed as NHWC float32 BGR 0–255; the model outputs sigmoid probabilities.
  General tags above ``captions.wd14.general_threshold``, character tags above
  ``character_threshold``, the most probable rating tag when ``rating: keep``.
- ``transformers``: any image-to-text model transformers loads without remote code
  (BLIP, BLIP-2, Florence-2) through AutoProcessor + AutoModelForImageTextToText.

:func:`describe` runs the backends a caption source needs and returns, per photo, what each
one said; :mod:`dbkit.captions` turns that into captions with the subject's name. Model
outputs are cached by the photo's content digest, the model's fingerprint (its files'
content) and the settings that change the output; a backend is only loaded on a cache miss.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import cpu_threads
from . import model_folders as mf
from .data import file_digest, open_rgb
from .files import atomic_write_json, read_json
from .hashing import cache_path, writable_cache_dir
from .model_folders import CAPTION_MODEL_SECTIONS as SECTIONS

# WD14 categories in selected_tags.csv
RATING, GENERAL, CHARACTER = 9, 0, 4
# Tags that are faces drawn with underscores: they keep them when underscores become spaces
# (the list SmilingWolf's own tagger demo uses).
KAOMOJIS = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9",
                      ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})
# names the preprocessing in the cache key: a change to it must not reuse old probabilities
WD14_PREP = "pad-white-center/bicubic/bgr-0-255/v1"


class CaptionModelError(RuntimeError):
    """A local caption model cannot be used; the message names the key and what to do."""


def describe(entries: list[dict], p: dict) -> list[dict]:
    """What the backends of ``captions.source`` say about each manifest entry:
    ``{"tagger_tags", "tag_scores"}`` from wd14, ``{"sentence"}`` from transformers, and
    ``from_cache`` (True when no model ran for that photo)."""
    c = p["captions"]
    pinned = cpu_threads.cache_fields(p)  # a run with `threads` set: its own cache entries
    out: list[dict[str, Any]] = [{"from_cache": True} for _ in entries]
    for section in SECTIONS[c["source"]]:
        folder = c[section]["model"]
        problem = mf.folder_problem(section, folder)
        if problem:
            raise CaptionModelError(problem)
        fp = mf.fingerprint(section, folder)
        run = _tag if section == mf.WD14 else _caption
        results, hits = run(entries, folder, fp, c[section], pinned)
        for o, r, hit in zip(out, results, hits):
            o.update(r)
            o["from_cache"] = o["from_cache"] and hit
    return out


def _digest(entry: dict) -> str:
    return entry.get("sha256") or file_digest(Path(entry["file"]))


def _cached(kind: str, key: dict, compute) -> tuple[Any, bool]:
    """(value, hit): the cached value for ``key``, or ``compute()`` written atomically. The
    file holds its key, so a truncated-hash collision recomputes rather than misleads."""
    path = cache_path(kind, key).with_suffix(".json")
    try:
        found = read_json(path)
    except ValueError:  # unreadable: written by something else; recompute over it
        found = None
    if isinstance(found, dict) and found.get("key") == key:
        return found["value"], True
    writable_cache_dir(path.parent)
    value = compute()
    atomic_write_json(path, {"key": key, "value": value})
    return value, False


# ----------------------------------------------------------------------------- WD14 tagger


class Wd14Tagger:
    """A WD14 ONNX tagger from a local folder (``model.onnx`` + ``selected_tags.csv``)."""

    def __init__(self, folder: str | Path, threads: int = 0):
        import onnxruntime as ort

        folder = Path(folder)
        self.names, self.categories = read_labels(folder / "selected_tags.csv")
        opts = ort.SessionOptions()
        # the run's `threads` where set (a float sum split otherwise can move a score); else as
        # OMP_NUM_THREADS says, and 0 = onnxruntime's choice
        opts.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
        providers = [x for x in wanted if x in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise CaptionModelError(f"'captions.wd14.model': {folder / 'model.onnx'} cannot be loaded by "
                                    f"onnxruntime ({e}): {_redownload(mf.WD14, folder)}") from e
        self.input = self.session.get_inputs()[0]
        self.size = input_size(self.input.shape, folder)
        width = self.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(self.names):
            raise CaptionModelError(f"'captions.wd14.model': {folder}: the model outputs {width} tags but "
                                    f"selected_tags.csv lists {len(self.names)}: the two files come from different "
                                    f"taggers; {_redownload(mf.WD14, folder)}")

    def probabilities(self, im: Image.Image) -> np.ndarray:
        """The model's probability of every tag of selected_tags.csv for one RGB image."""
        out = self.session.run(None, {self.input.name: prepare_image(im, self.size)})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)


def _redownload(section: str, folder: Path) -> str:
    return f"download it again (`{mf.download_hint(section, str(folder))}`)"


def read_labels(path: Path) -> tuple[list[str], np.ndarray]:
    """Tag names and categories of a WD14 ``selected_tags.csv``, in the model's output order."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["name"] for r in rows], np.array([int(r["category"]) for r in rows], dtype=np.int64)


def input_size(shape: list, folder: Path) -> int:
    """The square side of a WD14 model's NHWC input, read from the ONNX input shape."""
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
        raise CaptionModelError(f"'captions.wd14.model': {folder / 'model.onnx'} takes input {shape}, not "
                                "[batch, side, side, 3] as WD14 taggers do: point captions.wd14.model at a "
                                "wd-v1-4 / wd-v1-4-vit style tagger")
    return shape[1]


def prepare_image(im: Image.Image, size: int) -> np.ndarray:
    """[1, size, size, 3] float32 BGR 0–255: the photo centred on a white square (a tagger
    trained on padded, not cropped, pictures), resized bicubically, as SmilingWolf's tagger does."""
    im = im.convert("RGB")
    side = max(im.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    rgb = np.asarray(square, dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1])[None]


def select_tags(probs: np.ndarray, names: list[str], categories: np.ndarray, s: dict) -> list[tuple[str, float]]:
    """(tag, probability) per `captions.wd14` settings: the most probable rating tag first when
    kept, then character and general tags over their thresholds, most probable first."""
    probs = np.asarray(probs, dtype=np.float64)
    over = {GENERAL: s["general_threshold"], CHARACTER: s["character_threshold"]}
    picked = [i for i, (cat, pr) in enumerate(zip(categories.tolist(), probs)) if cat in over and pr > over[cat]]
    picked.sort(key=lambda i: (-probs[i], i))
    ratings = np.flatnonzero(categories == RATING)
    if s["rating"] == "keep" and ratings.size:
        picked.insert(0, int(ratings[np.argmax(probs[ratings])]))
    return [(tag_text(names[i], s["underscores"]), float(probs[i])) for i in picked]


def tag_text(name: str, underscores: str) -> str:
    """A tag as captions write it: `long_hair` → `long hair` unless underscores: keep (kaomojis
    such as `^_^` keep theirs either way)."""
    if underscores == "keep" or name in KAOMOJIS:
        return name
    return name.replace("_", " ")


def _tag(entries: list[dict], folder: str, fp: str | None, s: dict,
         pinned: dict) -> tuple[list[dict], list[bool]]:
    tagger: list[Wd14Tagger] = []  # loaded on the first cache miss only

    def probs_of(entry: dict) -> list[float]:
        if not tagger:
            tagger.append(Wd14Tagger(folder, pinned.get("threads", 0)))
        return tagger[0].probabilities(open_rgb(Path(entry["file"]))).tolist()

    names, categories = read_labels(Path(folder) / "selected_tags.csv")
    results, hits = [], []
    for e in entries:
        # the probabilities are cached, not the thresholded tags: a threshold sweep reruns no model
        key = {"image": _digest(e), "model": fp, "prep": WD14_PREP, **pinned}
        probs, hit = _cached("wd14", key, lambda e=e: probs_of(e))
        if len(probs) != len(names):
            raise CaptionModelError(f"'captions.wd14.model': {folder}: {len(probs)} probabilities for "
                                    f"{len(names)} tags in selected_tags.csv: {_redownload(mf.WD14, Path(folder))}")
        chosen = select_tags(np.asarray(probs), names, categories, s)
        results.append({"tagger_tags": [t for t, _ in chosen], "tag_scores": {t: round(x, 4) for t, x in chosen}})
        hits.append(hit)
    return results, hits


# ----------------------------------------------------------------------------- transformers captioner


class ImageToText:
    """A transformers image-to-text model (BLIP, BLIP-2, Florence-2 …) from a local folder."""

    def __init__(self, folder: str | Path):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise CaptionModelError(
                f"'captions.transformers.model': transformers cannot load {folder} as an image-to-text model "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): point it at a BLIP, BLIP-2 or "
                f"Florence-2 folder, e.g. `{mf.download_hint(mf.TRANSFORMERS)}`") from e
        self.model.to(self.device).eval()

    def caption(self, im: Image.Image, s: dict) -> str:
        """One sentence for an RGB image, per `captions.transformers` settings."""
        import torch

        kwargs: dict[str, Any] = {"images": im, "return_tensors": "pt"}
        if s["prompt"]:
            kwargs["text"] = s["prompt"]
        inputs = self.processor(**kwargs).to(self.device)
        torch.manual_seed(s["seed"])  # only a model whose generation config samples uses it
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=s["max_new_tokens"], num_beams=s["num_beams"])
        return self.processor.batch_decode(out, skip_special_tokens=True)[0].strip()


def _caption(entries: list[dict], folder: str, fp: str | None, s: dict,
             pinned: dict) -> tuple[list[dict], list[bool]]:
    model: list[ImageToText] = []  # loaded on the first cache miss only

    def sentence_of(entry: dict) -> str:
        if not model:
            model.append(ImageToText(folder))
        return model[0].caption(open_rgb(Path(entry["file"])), s)

    settings = {k: s[k] for k in ("max_new_tokens", "num_beams", "prompt", "seed")}
    results, hits = [], []
    for e in entries:
        sentence, hit = _cached("captioner", {"image": _digest(e), "model": fp, **settings, **pinned},
                                lambda e=e: sentence_of(e))
        results.append({"sentence": sentence})
        hits.append(hit)
    return results, hits
