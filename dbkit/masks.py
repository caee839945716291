"""Subject masks (white = subject): where a photo's mask comes from, for masked loss and matting.

Sources, first found wins:

1. `<stem>.mask.png` beside the photo (greyscale; grey values are partial weights, as in
   kohya's mask images), the size of the upright photo;
2. the photo's own transparency (alpha channel, or a palette/colour key marked transparent):
   a cut-out is its own mask;
3. on the toy world only (`data.instance_images: toyworld:…`), the oracle's object mask read
   from the pixels: the renderer draws one object on a flat background, so the region that
   differs from the background is the subject.

A photo with none of these has no mask; `require_mask` says how to give it one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .data import DataError, eight_bit, open_rgb, upright_size

MASK_SUFFIX = ".mask.png"


def mask_path(image: Path) -> Path:
    """Where a photo's user mask lives: `<stem>.mask.png` beside it."""
    return image.with_name(image.stem + MASK_SUFFIX)


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def load_mask(image: Path, *, toy: bool = False) -> Image.Image | None:
    """The photo's subject mask as an 8-bit L image at the upright photo's size, or None."""
    source = mask_source(image, toy=toy)
    if source == "file":
        with _opened(mask_path(image)) as m:
            return eight_bit(ImageOps.exif_transpose(m)).convert("L")
    if source == "alpha":
        with _opened(image) as im:
            return eight_bit(ImageOps.exif_transpose(im)).convert("RGBA").getchannel("A")
    return toy_mask(image) if source == "toy" else None


def mask_source(image: Path, *, toy: bool = False) -> str | None:
    """Which source gives the photo's mask: "file", "alpha", "toy" or None, read from the
    files' headers only (params loading asks this of every photo). A mask file whose size
    is not the upright photo's is a DataError naming both sizes."""
    user = mask_path(image)
    if user.exists():
        with _opened(user) as m, _opened(image) as im:
            have, want = upright_size(m), upright_size(im)
        if have != want:
            raise DataError(f"{user}: the mask is {have[0]}×{have[1]} but its photo {image.name} is "
                            f"{want[0]}×{want[1]} (upright): save the mask at the photo's size")
        return "file"
    with _opened(image) as im:
        if has_alpha(im):
            return "alpha"
    return "toy" if toy else None


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """Image.open whose failure, or a decoding failure while it is open, is a DataError
    naming the file."""
    what = "mask" if path.name.lower().endswith(MASK_SUFFIX) else "image"
    try:
        with Image.open(path) as im:
            yield im
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot read this {what} ({e}); re-save it as PNG") from e


def toy_mask(image: Path) -> Image.Image:
    """The toy-world oracle's object mask of a rendered photo, at the photo's size."""
    from .toyworld import oracle

    im = open_rgb(image)
    a = np.asarray(im, dtype=np.float32)
    _, bg = oracle.background_of(a)
    return Image.fromarray(fill_holes(oracle.object_mask(a, bg)).astype(np.uint8) * 255, "L")


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with its enclosed holes filled: a subject's marking in the background's
    colour (eyed_heart's white eye on a white backdrop) is still the subject."""
    import cv2

    n, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=4)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, edge) & ~mask
    return ~outside


def require_mask(image: Path, *, toy: bool = False, why: str = "train.masked_loss is true") -> Image.Image:
    """`load_mask`, or a DataError naming the photo and the ways to give it a mask."""
    mask = load_mask(image, toy=toy)
    if mask is None:
        raise DataError(f"{image}: {why} but this photo has no mask: save one as {mask_path(image).name} beside it "
                        "(white = subject, black = background, same size as the photo), or give the photo a "
                        f"transparent background (PNG with alpha); or change {why.split()[0]}")
    return mask


def missing_masks(images: list[Path], *, toy: bool = False) -> list[Path]:
    """The photos that have no mask (none of the sources above)."""
    return [f for f in images if mask_source(f, toy=toy) is None]


def check_all(images: list[Path], *, toy: bool = False, why: str = "train.masked_loss is true") -> None:
    """One DataError naming every photo without a mask (masked loss and `data.matte: mask`
    need them all); `why` says which setting asks."""
    missing = missing_masks(images, toy=toy)
    if missing:
        names = ", ".join(f.name for f in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        key = why.split()[0]
        raise DataError(f"{missing[0].parent}: {why} but {len(missing)} photo(s) have no mask ({names}): save "
                        f"<stem>{MASK_SUFFIX} beside each (white = subject, black = background, the photo's size) or "
                        f"give them a transparent background; or change {key}")


def is_toy(p: dict) -> bool:
    """Whether the instance photos are the toy world's renders (the oracle can mask them)."""
    return str(p["data"]["instance_images"]).startswith("toyworld:")
