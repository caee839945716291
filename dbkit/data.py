"""Instance and class image sets: find, validate, crop, bucket, and record them in a manifest.

The same path serves a user's photo folder and the toy world's subjects (which are first
written to `data/toyworld/<name>/` as an ordinary folder). Every image is opened and
checked up front, so a broken file stops the run in the data notebook with its name,
not in the middle of training.

Image policy (what happens to each kind of picture; warnings are logged and kept in data.json,
which the 01_data page lists):

- Formats: .png .jpg .jpeg .webp .bmp are read. Other image files beside them (.heic, .avif,
  .psd, .tif, raw …) are skipped with a warning naming them: convert them to JPEG or PNG.
- Orientation: the EXIF orientation is applied (a phone's portrait photo stays upright).
- Modes: everything becomes 8-bit RGB. 16-bit greyscale (PNG mode I;16 / I) is scaled by
  255/65535 (Pillow's own conversion clips at 255: almost every pixel would turn white);
  16-bit colour PNGs are read by Pillow at 8 bits; palette, greyscale, CMYK and bilevel
  images are converted. Transparency (alpha, LA, a palette or colour key marked transparent)
  is composited on white, the usual backdrop of cut-outs.
- Shape: an image longer than 4:1 is kept with a warning that says what training takes of
  it (a centred square at the default `data.center_crop: true`): crop it around the subject.
- Count: fewer than 3 instance photos is allowed with a warning (DreamBooth needs a few
  views of the subject to tell it from the scene).
- Bad files: empty, not an image, truncated or damaged, over Pillow's decompression-bomb
  limit (Image.MAX_IMAGE_PIXELS, 89 MP: both its warning and its error count), or smaller
  than 8 px. `data.on_bad_image: fail` (the default) stops with one DataError listing every
  bad file and why; `skip` drops them and lists them in data.json and on the page. A bad
  class image always stops the run: training reads that folder as it is.
- Size: any size is read. Checks and thumbnails decode JPEGs at reduced scale (Image.draft)
  and one image at a time; reports show thumbnails of at most THUMB px on the long side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported where it is used: config.load fingerprints data without it
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Image files a phone, camera or editor writes that dbkit does not read: named in a warning
# rather than passed over in silence (a HEIC beside PNGs would otherwise just vanish).
OTHER_IMAGE_SUFFIXES = (".heic", ".heif", ".avif", ".jxl", ".psd", ".tif", ".tiff", ".gif", ".svg", ".jp2",
                        ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf")
SIDECAR_SUFFIXES = (".txt", ".json", ".jsonl")  # captions and metadata beside the photos
TOYWORLD_DATA = Path("data/toyworld")
CLASS_PREFIX = "class:"  # toyworld:class:<shape>: the world's ordinary objects of a class (real class images)
ON_BAD_IMAGE = ("fail", "skip")
MAX_ASPECT = 4.0   # longer than this (long side / short side): warn and say what the crop keeps
MIN_PHOTOS = 3     # fewer instance photos than this: warn
THUMB = 256        # px, long side of the pictures the reports show
EXIF_ORIENTATION = 0x0112

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A problem with the user's images; the message names the file and what to do."""


class BadImage(DataError):
    """One image that cannot be used; the message is the reason (the caller names the file)."""


def resolve_folder(spec: str) -> Path:
    """A folder path, `toyworld:<subject or style>[@n]` or `toyworld:class:<shape>[@n]` (real
    class images), written once to data/toyworld/<name>[@n]/ (class/<shape>[@n]/)."""
    if spec.startswith("toyworld:"):
        from .toyworld import classes, styles, subjects

        name, n = _toyworld_spec(spec)
        folder = TOYWORLD_DATA / spec.split(":", 1)[1].replace(":", "/")
        if name.startswith(CLASS_PREFIX):
            return classes.write_folder(name.removeprefix(CLASS_PREFIX), folder, n)
        if name in styles.STYLES:
            return styles.write_folder(styles.get(name), folder, n)
        return subjects.write_folder(subjects.get(name), folder, n)
    return Path(spec)


def _toyworld_spec(spec: str) -> tuple[str, int | None]:
    """`toyworld:<subject>[@n]` → (subject, n or None); `toyworld:class:<shape>[@n]` → ("class:<shape>", n)."""
    subject, _, n = spec.split(":", 1)[1].partition("@")
    return subject, int(n) if n else None


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; put your subject photos there or point "
                        "data.instance_images at the folder that holds them")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not is_mask(p))
    if not files:
        others = unreadable_files(folder)
        found = f" (found {', '.join(others)}: convert them to JPEG or PNG)" if others else ""
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found{found}; add some")
    return files


def unsupported_note(folder: Path, shown: int = 3) -> str:
    """The files of `folder` that are not images dbkit reads (nor caption sidecars), the first
    `shown` by name, and how to convert them; "" when there are none. A folder of phone photos
    (.heic) otherwise reads as empty to a user who can see the photos in it."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() not in (*IMAGE_SUFFIXES, *SIDECAR_SUFFIXES))
    if not names:
        return ""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    heif = " (HEIC: export as JPEG, or `pip install pillow-heif` and re-save with Pillow)" if any(
        n.lower().endswith((".heic", ".heif")) for n in names) else ""
    return (f"it holds {len(names)} file(s) dbkit does not read: {', '.join(names[:shown])}{more}; "
            f"dbkit reads {' '.join(IMAGE_SUFFIXES)}: convert them to PNG or JPEG{heif}")


def unreadable_files(folder: Path) -> list[str]:
    """Names of the image files in `folder` whose format dbkit does not read."""
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in OTHER_IMAGE_SUFFIXES)


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


def open_rgb(path: Path, max_side: int = 0) -> Image.Image:
    """Open an image upright (EXIF orientation applied) in 8-bit RGB (see :func:`eight_bit`),
    transparency composited on white (see :func:`flatten_on_white`); errors name the file.
    `max_side` > 0: a thumbnail at most that long; a JPEG is then decoded at reduced scale
    (Image.draft), so a 12-MP photo never exists at full size in memory."""
    try:
        with Image.open(path) as im:
            if max_side:
                im.draft(im.mode, (max_side, max_side))  # still ≥ max_side on both sides
            im = flatten_on_white(eight_bit(ImageOps.exif_transpose(im)))
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot read this image ({e}); re-save it as PNG/JPEG or remove it") from e
    if max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # reduce()s first: fast on big PNGs
    return im


def eight_bit(im: Image.Image) -> Image.Image:
    """16-bit greyscale (PNG mode I;16, or I) as 8-bit L scaled by 255/65535; other modes as
    they are. Pillow's own convert clips at 255, so a 16-bit photo would turn almost all white.
    PNG has no 32-bit greyscale: mode I from our formats holds 16-bit samples."""
    if im.mode != "I" and not im.mode.startswith("I;16"):
        return im
    a = np.asarray(im).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")  # rounded


def flatten_on_white(im: Image.Image) -> Image.Image:
    """RGB of an image, its transparent parts (alpha channel, or a palette/colour key marked
    transparent) composited on white. A plain convert("RGB") drops alpha and shows whatever
    colour the transparent pixels store, usually black: a cut-out subject would be trained
    on a black backdrop. White is the usual backdrop of cut-outs and product shots."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im  # convert would copy it: one full-size photo fewer in memory
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
    """One record per image: file, size, content hash, sidecar caption and metadata record.
    Any bad image raises (see :func:`scan` for skipping them and for the warnings)."""
    return scan(folder, min_size=min_size, max_images=max_images).manifest


@dataclass
class Scan:
    """What :func:`scan` found: the usable images, the bad ones it skipped, the warnings."""

    manifest: list[dict]
    skipped: list[dict] = field(default_factory=list)  # {"file": …, "reason": …}
    warnings: list[str] = field(default_factory=list)


def scan(folder: Path, *, crop: dict | None = None, min_size: int = 8, max_images: int = 0,
         on_bad: str = "fail", instance: bool = True) -> Scan:
    """Check every image of `folder` (the first `max_images` good ones when set) and record
    them; bad ones raise one DataError naming all of them (`on_bad` "fail") or are skipped
    ("skip"). `crop` (the data params) says what training crops, for the aspect warning.
    `instance` False: a class-image folder (no count warning; bad files are never skipped,
    since training reads that folder itself). Warnings are logged and returned."""
    if on_bad not in ON_BAD_IMAGE:
        raise DataError(f"data.on_bad_image is {on_bad!r}; allowed values: {', '.join(ON_BAD_IMAGE)}")
    meta = read_metadata(folder)
    found, bad = Scan([]), []
    for f in list_images(folder):
        if max_images and len(found.manifest) >= max_images:
            break
        try:
            size = probe(f, min_size)
        except BadImage as e:
            bad.append({"file": str(f), "reason": str(e)})
            continue
        found.manifest.append(_record(f, size, meta))
        found.warnings += aspect_warnings(f, size, crop)
    found.skipped = _handle_bad(folder, bad, on_bad if instance else "fail", instance)
    if not found.manifest:
        raise DataError(f"{folder}: no usable image is left after skipping the bad ones; add photos that open")
    found.warnings = _folder_warnings(folder, found, instance) + found.warnings
    for w in found.warnings:
        log.warning(w)
    return found


def _record(f: Path, size: tuple[int, int], meta: dict[str, dict]) -> dict:
    sidecar = f.with_suffix(".txt")
    return {
        "file": str(f),
        "width": size[0],
        "height": size[1],
        "sha256": file_digest(f),
        "sidecar_caption": sidecar.read_text().strip() if sidecar.exists() else None,
        "record": meta.get(f.name),
        "subject_area": subject_area(f, meta.get(f.name)),
    }


def _handle_bad(folder: Path, bad: list[dict], on_bad: str, instance: bool) -> list[dict]:
    """Raise one error listing every bad file (fail), or return them to be recorded (skip)."""
    if not bad:
        return []
    if on_bad == "fail":
        lines = "".join(f"\n  {Path(b['file']).name}: {b['reason']}" for b in bad)
        fix = ("fix or remove them, or set data.on_bad_image: skip to train without them" if instance
               else "fix or remove them (training reads data.class_images as it is)")
        raise DataError(f"{folder}: {len(bad)} image(s) cannot be used:{lines}\n{fix}")
    return bad


def _folder_warnings(folder: Path, found: Scan, instance: bool) -> list[str]:
    """Unread formats, skipped files and too few photos, one line each."""
    out = []
    if others := unreadable_files(folder):
        out.append(f"{folder}: skipped {', '.join(others)}: dbkit reads {' '.join(IMAGE_SUFFIXES)} only; "
                   "convert them to JPEG or PNG to train on them")
    if found.skipped:
        names = ", ".join(Path(b["file"]).name for b in found.skipped)
        out.append(f"{folder}: skipped {len(found.skipped)} bad image(s) (data.on_bad_image: skip): {names}")
    if instance and len(found.manifest) < MIN_PHOTOS:
        out.append(f"{folder}: only {len(found.manifest)} photo(s); DreamBooth needs at least {MIN_PHOTOS} "
                   "views of the subject (other backgrounds, poses) to tell it from the scene")
    return out


@contextmanager
def _bomb_guard() -> Iterator[None]:
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; such a picture is refused too
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def probe(path: Path, min_size: int = 8) -> tuple[int, int]:
    """Upright (width, height) of an image that decodes to its last byte; BadImage says why
    not. A JPEG is decoded at reduced scale: every byte is still read (truncation shows) but
    a 12-MP photo costs a few MB."""
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with _bomb_guard(), Image.open(path) as im:
            size = upright_size(im)
            im.draft(im.mode, (THUMB, THUMB))
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"too many pixels to open safely (Pillow's decompression-bomb guard: {e}); "
                       f"downscale it below {Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP") from e
    except UnidentifiedImageError as e:
        raise BadImage("not an image Pillow can read (a wrong extension, or not a picture)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow's ways of saying "damaged"
        raise BadImage(f"damaged or truncated ({e}); re-save or re-copy it") from e
    if min(size) < min_size:
        raise BadImage(f"{size[0]}×{size[1]} is too small to train on; use ≥ {min_size}px")
    return size


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied (5–8 turn the picture a quarter)."""
    w, h = im.size
    return (h, w) if im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8) else (w, h)


def aspect_warnings(f: Path, size: tuple[int, int], crop: dict | None) -> list[str]:
    """A warning for an image longer than MAX_ASPECT:1, saying what training takes of it."""
    w, h = size
    if max(w, h) <= MAX_ASPECT * min(w, h):
        return []
    return [f"{f.name} is {w}×{h} (about {max(w, h) / min(w, h):.0f}:1): {crop_note(w, h, crop or {})}; "
            "crop the photo around the subject to choose what is kept"]


def crop_note(w: int, h: int, d: dict) -> str:
    """What training takes of a w×h image, as train.load_examples crops it."""
    res = d.get("resolution", 512)
    if d.get("buckets"):
        size = bucket_for(w, h, res, step=64 if res >= 256 else 8)  # train.load_examples's step
        how = f"the centre of its {size[0]}×{size[1]} bucket"
    else:
        size = (res, res)
        how = "a centred square" if d.get("center_crop", True) else "a random square each step"
    s = max(size[0] / w, size[1] / h)  # scale to cover, then crop
    kept = size[0] * size[1] / (w * s * h * s)
    return f"training takes {how}, {round(size[0] / s)}×{round(size[1] / s)} px ({100 * kept:.2g}% of the picture)"


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
        from .toyworld import classes, scenes, styles, subjects

        name, n = _toyworld_spec(spec)
        if name.startswith(CLASS_PREFIX) and name.removeprefix(CLASS_PREFIX) in scenes.SHAPES:
            files = classes.folder_files(name.removeprefix(CLASS_PREFIX), n)
        elif name in styles.STYLES:
            files = styles.folder_files(styles.get(name), n)
        elif name in subjects.SUBJECTS:
            files = subjects.folder_files(subjects.get(name), n)
        else:
            return None
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


def write_png(path: Path, im: Image.Image) -> None:
    """Save a derived picture (a crop, a matte, a mask) as PNG, atomically (lossless: it is
    trained on, and masks must keep their values)."""
    import io

    from .files import atomic_write_bytes

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
