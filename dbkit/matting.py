"""Background removal (`data.matte`): a subject mask per photo, then the photo composited on
`data.matte_background`, or kept as it is with its mask beside it for masked loss.

Backends:
- `mask`: the photo's own mask (dbkit.masks: `<stem>.mask.png`, alpha, the toy oracle);
- `rembg`: rembg's U²-Net-style matting from a local ONNX file (`data.matte_model`, rembg's
  `u2net_custom` session: nothing is downloaded). rembg is imported only here; missing, it is
  one error naming the package and the key.

People photographed in cluttered rooms teach the model the room; the notes matte them out.
Composited photos (and their masks, as `<stem>.mask.png`) are written to `<run>/matted/` and
the manifest points at them, after the detector's crops (dbkit.framing), so the matte is of
what training sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from PIL import Image, ImageColor

from . import masks
from .data import file_digest, open_rgb, write_png

BACKENDS = ("none", "mask", "rembg")
MATTED = "matted"  # subfolder of the run folder holding the matted photos


class MattingError(RuntimeError):
    """A matting backend that cannot run; the message names the key or package."""


class Matter(Protocol):
    def mask(self, path: Path, im: Image.Image) -> Image.Image: ...


class MaskMatter:
    """The photo's own mask (see dbkit.masks for the sources)."""

    def __init__(self, toy: bool = False) -> None:
        self.toy = toy

    def mask(self, path: Path, im: Image.Image) -> Image.Image:
        return masks.require_mask(path, toy=self.toy, why="data.matte is mask")


class RembgMatter:
    """rembg with a local ONNX matting model."""

    def __init__(self, model: str) -> None:
        if not model or not Path(model).is_file():
            raise MattingError(f"data.matte is rembg but data.matte_model {model!r} is not a file: point it at a "
                               "local ONNX matting model (e.g. u2net.onnx, downloaded elsewhere)")
        try:
            import rembg
        except ImportError as e:
            raise MattingError("data.matte is rembg, which needs the rembg package: `pip install rembg`, or set "
                               "data.matte: mask with <stem>.mask.png beside each photo") from e
        self.rembg = rembg
        self.session = rembg.new_session("u2net_custom", model_path=str(Path(model).resolve()))

    def mask(self, path: Path, im: Image.Image) -> Image.Image:
        out = self.rembg.remove(im, session=self.session, only_mask=True)
        return out.convert("L").resize(im.size, Image.Resampling.BILINEAR) if out.size != im.size else out.convert("L")


def make_matter(d: dict, *, toy: bool = False) -> Matter | None:
    name = d["matte"]
    if name == "none":
        return None
    if name == "mask":
        return MaskMatter(toy)
    if name == "rembg":
        return RembgMatter(d["matte_model"])
    raise MattingError(f"data.matte is {name!r}; allowed values: {', '.join(BACKENDS)}")


def composite(im: Image.Image, mask: Image.Image, colour: str) -> Image.Image:
    """The photo where the mask is white, `colour` where it is black, blended in between."""
    return Image.composite(im, Image.new("RGB", im.size, ImageColor.getrgb(colour)), mask)


def matte_manifest(manifest: list[dict], d: dict, rd: Path, *, toy: bool = False) -> list[dict]:
    """Each photo matted into `<rd>/matted/` with its mask; entries point at the results."""
    matter = make_matter(d, toy=toy)
    if matter is None:
        return manifest
    out = []
    for entry in manifest:
        src = Path(entry["file"])
        im = open_rgb(src)
        mask = matter.mask(src, im)
        picture = composite(im, mask, d["matte_background"]) if d["matte_background"] else im
        dest = rd / MATTED / (src.name if src.suffix.lower() == ".png" else src.name + ".png")
        write_png(dest, picture)
        write_png(masks.mask_path(dest), mask)
        out.append({**entry, "file": str(dest), "matted_from": str(src), "sha256": file_digest(dest)})
    return out
