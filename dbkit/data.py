"""Instance and class image sets: find, validate, crop, bucket, and record them in a manifest.

The same path serves a user's photo folder and the toy world's subjects (which are first
written to `data/toyworld/<name>/` as an ordinary folder). Every image is opened and
checked up front, so a broken file stops the run in the data notebook with its name,
not in the middle of training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TOYWORLD_DATA = Path("data/toyworld")


class DataError(ValueError):
    """A problem with the user's images; the message names the file and what to do."""


def resolve_folder(spec: str) -> Path:
    """A folder path, or `toyworld:<subject>[@n]`, written once to data/toyworld/<subject>[@n]/."""
    if spec.startswith("toyworld:"):
        from .toyworld import subjects

        name = spec.split(":", 1)[1]
        subject, _, n = name.partition("@")
        return subjects.write_folder(subjects.get(subject), TOYWORLD_DATA / name, int(n) if n else None)
    return Path(spec)


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; put your subject photos there or point "
                        "data.instance_images at the folder that holds them")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not is_mask(p))
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found; add some")
    return files


def is_mask(path: Path) -> bool:
    """`<stem>.mask.png` beside a photo marks its subject (white) and is not a photo itself."""
    return path.name.lower().endswith(".mask.png")


def subject_area(path: Path, record: dict | None) -> float | None:
    """Share of the frame the subject covers: from `<stem>.mask.png` beside the image, else
    the metadata record's `subject_area`; None when neither exists."""
    mask = path.with_name(path.stem + ".mask.png")
    if mask.exists():
        try:
            with Image.open(mask) as m:
                return float((np.asarray(m.convert("L")) > 127).mean())
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{mask}: cannot read this mask ({e}); re-save it as a grey PNG (white = subject)") from e
    if record and "subject_area" in record:
        return float(record["subject_area"])
    return None


def filter_by_area(manifest: list[dict], min_area: float, source: str) -> tuple[list[dict], list[dict]]:
    """Keep the images whose subject covers at least `min_area` of the frame (kohya users
    drop photos where the subject is small: it then learns the context, not the subject).
    Returns (kept, dropped); 0 keeps everything."""
    if min_area <= 0:
        return manifest, []
    unknown = [r["file"] for r in manifest if r["subject_area"] is None]
    if unknown:
        raise DataError(f"{unknown[0]}: data.min_subject_area is set but this image's subject area is unknown; "
                        "put a mask <stem>.mask.png beside it (white = subject) or a subject_area in "
                        "metadata.jsonl, or set data.min_subject_area: 0")
    kept = [r for r in manifest if r["subject_area"] >= min_area]
    dropped = [r for r in manifest if r["subject_area"] < min_area]
    if not kept:
        largest = max(r["subject_area"] for r in manifest)
        raise DataError(f"{source}: data.min_subject_area={min_area} drops every image (the largest subject "
                        f"covers {largest:.2f} of its frame); lower it")
    return kept, dropped


def open_rgb(path: Path) -> Image.Image:
    """Open an image upright (EXIF orientation applied) in RGB; errors name the file."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot read this image ({e}); re-save it as PNG/JPEG or remove it") from e


def read_metadata(folder: Path) -> dict[str, dict]:
    """metadata.jsonl (one JSON object with `file_name` per line, as in HF imagefolder)."""
    path = folder / "metadata.jsonl"
    if not path.exists():
        return {}
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[rec["file_name"]] = rec
        except (json.JSONDecodeError, KeyError) as e:
            raise DataError(f"{path}:{n}: each line must be a JSON object with a file_name ({e})") from e
    return out


def build_manifest(folder: Path, *, min_size: int = 8, max_images: int = 0) -> list[dict]:
    """One record per image: file, size, content hash, sidecar caption and metadata record."""
    meta = read_metadata(folder)
    files = list_images(folder)
    if max_images:
        files = files[:max_images]
    out = []
    for f in files:
        im = open_rgb(f)
        if min(im.size) < min_size:
            raise DataError(f"{f}: {im.size[0]}×{im.size[1]} is too small to train on; use ≥ {min_size}px")
        sidecar = f.with_suffix(".txt")
        out.append({
            "file": str(f),
            "width": im.size[0],
            "height": im.size[1],
            "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
            "sidecar_caption": sidecar.read_text().strip() if sidecar.exists() else None,
            "record": meta.get(f.name),
            "subject_area": subject_area(f, meta.get(f.name)),
        })
    return out


def scale_short_side(im: Image.Image, resolution: int) -> Image.Image:
    w, h = im.size
    s = resolution / min(w, h)
    return im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)


def crop_resize(im: Image.Image, resolution: int, *, center: bool = True,
                rng: np.random.Generator | None = None) -> Image.Image:
    """Scale the short side to `resolution`, then crop a square (centre or random)."""
    im = scale_short_side(im, resolution)
    w, h = im.size
    if center or rng is None:
        x, y = (w - resolution) // 2, (h - resolution) // 2
    else:
        x, y = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    return im.crop((x, y, x + resolution, y + resolution))


def cover_crop(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover (width, height), then centre-crop to it."""
    w, h = size
    s = max(w / im.width, h / im.height)
    im = im.resize((max(w, round(im.width * s)), max(h, round(im.height * s))), Image.BICUBIC)
    x, y = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((x, y, x + w, y + h))


def to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB image → float tensor in [-1, 1], channels first (what the VAE expects)."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def to_image(t: torch.Tensor) -> Image.Image:
    """The inverse of :func:`to_tensor` (values outside [-1, 1] are clipped)."""
    return Image.fromarray(((t.detach().float().cpu().permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round()
                           .byte().numpy())


def bucket_for(width: int, height: int, resolution: int, step: int = 64) -> tuple[int, int]:
    """Aspect-ratio bucket: the (w, h), multiples of `step`, with area ≈ resolution² whose
    ratio is nearest the image's (the notes sort images by height/width ratio)."""
    step = min(step, resolution)
    area, ratio = resolution * resolution, height / width
    best, best_err = (resolution, resolution), float("inf")
    for w in range(step, 2 * resolution + 1, step):
        h = max(step, round(area / w / step) * step)
        err = abs(np.log((h / w) / ratio))
        if err < best_err:
            best, best_err = (w, h), err
    return best
