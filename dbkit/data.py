"""Instance and class image sets: find, validate, crop, bucket, and record them in a manifest.

The same path serves a user's photo folder and the toy world's subjects (which are first
written to `data/toyworld/<name>/` as an ordinary folder). Every image is opened and
checked up front, so a broken file stops the run in the data notebook with its name,
not in the middle of training.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported where it is used: config.load fingerprints data without it
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TOYWORLD_DATA = Path("data/toyworld")


class DataError(ValueError):
    """A problem with the user's images; the message names the file and what to do."""


def resolve_folder(spec: str) -> Path:
    """A folder path, or `toyworld:<subject>[@n]`, written once to data/toyworld/<subject>[@n]/."""
    if spec.startswith("toyworld:"):
        from .toyworld import subjects

        name, n = _toyworld_spec(spec)
        return subjects.write_folder(subjects.get(name), TOYWORLD_DATA / spec.split(":", 1)[1], n)
    return Path(spec)


def _toyworld_spec(spec: str) -> tuple[str, int | None]:
    """`toyworld:<subject>[@n]` → (subject, n or None)."""
    subject, _, n = spec.split(":", 1)[1].partition("@")
    return subject, int(n) if n else None


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
    """Open an image upright (EXIF orientation applied) in RGB, transparency composited on
    white (see :func:`flatten_on_white`); errors name the file."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return flatten_on_white(im)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot read this image ({e}); re-save it as PNG/JPEG or remove it") from e


def flatten_on_white(im: Image.Image) -> Image.Image:
    """RGB of an image, its transparent parts (alpha channel, or a palette/colour key marked
    transparent) composited on white. A plain convert("RGB") drops alpha and shows whatever
    colour the transparent pixels store, usually black: a cut-out subject would be trained
    on a black backdrop. White is the usual backdrop of cut-outs and product shots."""
    if im.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in im.info:
        return im.convert("RGB")
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


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


# --------------------------------------------------------------------------- content fingerprints
# The run hash covers what a run reads, not only where from: replacing a photo, mask, caption
# or metadata line under the same folder name makes a new run instead of reusing the old one.

_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime, inode) → sha256: each photo hashed once per process
# A file written this recently may be rewritten within the clock's granularity without its
# mtime changing (git's "racy" files), so its digest is recomputed rather than cached.
_RACY_S = 2.0


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, cached while its size, mtime and inode stay the same."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if time.time() - st.st_mtime > _RACY_S:
        _DIGESTS[key] = digest
    return digest


def read_files(folder: Path) -> list[Path]:
    """Every file the data path can read from an image folder: the images, their masks and
    caption sidecars (.txt), and metadata.jsonl."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not is_mask(p)
                    and p.is_file())
    extras = [q for p in images for q in (p.with_name(p.stem + ".mask.png"), p.with_suffix(".txt"))]
    return images + [q for q in [*extras, folder / "metadata.jsonl"] if q.is_file()]


def _combine(digests: dict[str, str | None]) -> str:
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()[:16]


def folder_fingerprint(spec: str) -> str | None:
    """A short hash of the names and bytes of :func:`read_files` (names only, not the folder's
    path: a copied folder keeps its fingerprint); None when there is no such folder.
    A `toyworld:` spec is fingerprinted by the files it renders to, without writing them
    (loading params must not write data): exactly what resolve_folder puts on disk."""
    if spec.startswith("toyworld:"):
        from .toyworld import subjects

        name, n = _toyworld_spec(spec)
        if name not in subjects.SUBJECTS:
            return None
        files = subjects.folder_files(subjects.get(name), n)
        return _combine({f: hashlib.sha256(b).hexdigest() for f, b in files.items()})
    folder = Path(spec)
    if not spec or not folder.is_dir():
        return None
    return _combine({p.name: file_digest(p) for p in read_files(folder)})


def data_fingerprint(p: dict) -> str | None:
    """The data part of a run's identity: the instance folder's fingerprint, combined with the
    class-image folder's when prior preservation reads one (generated class images follow
    from the base and params, already in the hash). None while the instance folder is missing."""
    d = p.get("data") or {}
    instance = folder_fingerprint(d.get("instance_images") or "")
    if instance is None:
        return None
    klass = d.get("class_images")
    if not (klass and (p.get("prior") or {}).get("enabled")):
        return instance
    return _combine({"instance": instance, "class": folder_fingerprint(klass)})


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
    im = scale_to_cover(im, size)
    x, y = center_offset(im.size, size)
    return im.crop((x, y, x + size[0], y + size[1]))


def scale_to_cover(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The image scaled (aspect kept) to the smallest size that covers (width, height);
    for a square size this is :func:`scale_short_side`."""
    w, h = size
    s = max(w / im.width, h / im.height)
    return im.resize((max(w, round(im.width * s)), max(h, round(im.height * s))), Image.BICUBIC)


def center_offset(have: tuple[int, int], want: tuple[int, int]) -> tuple[int, int]:
    """(left, top) of a centred (width, height) `want` crop of a `have`-sized image."""
    return (have[0] - want[0]) // 2, (have[1] - want[1]) // 2


def to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB image → float tensor in [-1, 1], channels first (what the VAE expects)."""
    import torch

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
