"""Read back from any 64×64 image what the toy-world renderer controls, and spot a subject.

`read(img)` returns background colour, object colour, shape, pattern, size and position;
`signature_score(img, subject)` says how closely the object's paint matches a subject's
(its two tones, their split and its marking, in the object's own frame). Both work on
generated images, so they tolerate blur and stray pixels: colours go to the nearest
palette entry, the object is the largest connected region that differs from the
background, and the shape is matched against normalised templates.

This is the toy world's stand-in for CLIP/DINO: exact where those are approximate, and
what every metric on the toy world is built on.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from functools import lru_cache

import numpy as np
from PIL import Image

from . import scenes, styles
from .styles import Style
from .subjects import Subject, render_subject

_MASK_DISTANCE = 40.0  # RGB distance from the background that counts as "object"
_TEMPLATE = 20  # side of the normalised shape / signature templates
SIGNATURE_THRESHOLD = 0.6  # signature_score at or above this counts as "the subject"
STYLE_THRESHOLD = 0.6  # style_score at or above this counts as "in the style"
_STYLE_DISTANCE = 70.0  # RGB distance to the style's colour that still counts as painted


@dataclasses.dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None
    shape: str | None
    pattern: str | None
    size: str | None
    position: str | None
    object_pixels: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _array(img: Image.Image | np.ndarray) -> np.ndarray:
    a = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.float32)
    if a.shape != (scenes.SIZE, scenes.SIZE, 3):
        a = np.asarray(Image.fromarray(a.astype(np.uint8)).resize((scenes.SIZE, scenes.SIZE), Image.BOX),
                       dtype=np.float32)
    return a


def _nearest(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[list[str], np.ndarray]:
    names = list(palette)
    ref = np.array([palette[n] for n in names], np.float32)
    d = np.linalg.norm(pixels[..., None, :] - ref, axis=-1)
    return names, d.argmin(-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected region (plain BFS: 64×64 is small, and scipy is not a dependency)."""
    seen = np.zeros_like(mask, bool)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp, q = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while q:
            y, x = q.popleft()
            comp.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        q.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask, bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def background_of(a: np.ndarray) -> tuple[str, np.ndarray]:
    """Background name (majority of the 2-pixel border) and its measured RGB."""
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3),
                             a[:, -2:].reshape(-1, 3)])
    names, idx = _nearest(border, scenes.BACKGROUNDS)
    winner = np.bincount(idx, minlength=len(names)).argmax()
    return names[winner], np.median(border[idx == winner], axis=0)


def object_mask(a: np.ndarray, bg_rgb: np.ndarray) -> np.ndarray:
    return _largest_component(np.linalg.norm(a - bg_rgb, axis=-1) > _MASK_DISTANCE)


def _crop_norm(arr: np.ndarray, mask: np.ndarray, resample) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = arr[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    if crop.ndim == 2:
        img = Image.fromarray((crop * 255).astype(np.uint8))
        return np.asarray(img.resize((_TEMPLATE, _TEMPLATE), resample), np.float32) / 255.0
    return np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((_TEMPLATE, _TEMPLATE), resample),
                      np.float32)


@lru_cache(maxsize=1)
def _shape_templates() -> dict[str, np.ndarray]:
    out = {}
    for shape in scenes.SHAPES:
        m = np.asarray(scenes.shape_mask(shape, 128, 128, 100)) > 127
        out[shape] = _crop_norm(m.astype(np.float32), m, Image.BOX) > 0.5
    return out


def _classify_shape(mask: np.ndarray) -> str:
    norm = _crop_norm(mask.astype(np.float32), mask, Image.BOX) > 0.5
    best, best_iou = scenes.SHAPES[0], -1.0
    for shape, t in _shape_templates().items():
        iou = (norm & t).sum() / max(1, (norm | t).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def _pattern(a: np.ndarray, mask: np.ndarray, colour: str) -> str:
    """Plain, striped or dotted, from the lighter shade inside the object: edge pixels are
    left out (antialiasing mixes the background in), and stripes are told from dots by how
    much the shade's share varies from row to row (stripes are horizontal)."""
    inner = _erode(mask)
    if inner.sum() < 8:
        inner = mask
    names, idx = _nearest(a[inner], _SHADES)
    is_tint = np.array(names)[idx] == colour + "+tint"
    if is_tint.mean() < 0.08:
        return "plain"
    t = np.zeros(mask.shape, np.float32)
    t[inner] = is_tint
    rows = [t[y][inner[y]].mean() for y in range(mask.shape[0]) if inner[y].sum() >= 3]
    return "striped" if np.var(rows) > 0.16 else "dotted"


_SHADES = {**{c: v for c, v in scenes.OBJECT_COLOURS.items()},
           **{c + "+tint": scenes.tint(v) for c, v in scenes.OBJECT_COLOURS.items()}}


def style_score(img: Image.Image | np.ndarray, style: Style) -> float:
    """Share of the inside of the style's region painted in the style's colour."""
    a = _array(img)
    return _style_score(a, style)


def _style_score(a: np.ndarray, style: Style) -> float:
    """A pixel is painted when it is near the style's colour AND nearer to it than to every
    background colour: orange lies 71 RGB units from the yellow background, so a generated
    yellow background a few units off its palette value read as orange corners by distance
    alone (a base model drawing yellow backgrounds scored "cornered")."""
    px = a[styles.core(style.name)]
    names, idx = _nearest(px, {**scenes.BACKGROUNDS, "style": style.rgb})
    near = np.linalg.norm(px - np.array(style.rgb, np.float32), axis=-1) < _STYLE_DISTANCE
    return float((near & (idx == names.index("style"))).mean())


def has_style(img: Image.Image | np.ndarray, style: Style) -> bool:
    return style_score(img, style) >= STYLE_THRESHOLD


def _unstyled(a: np.ndarray) -> np.ndarray:
    """The picture under any style it carries: the style's region repainted in the
    background colour read from the rest of the border, so that the scene reading (and a
    subject's signature) is the same with or without a style on top."""
    painted = np.zeros(a.shape[:2], bool)
    for style in styles.STYLES.values():
        if _style_score(a, style) >= STYLE_THRESHOLD:
            painted |= styles.region(style.name)
    if not painted.any():
        return a
    edge = np.zeros_like(painted)
    edge[:2], edge[-2:], edge[:, :2], edge[:, -2:] = True, True, True, True
    rest = a[edge & ~painted]
    names, idx = _nearest(rest, scenes.BACKGROUNDS)
    winner = np.bincount(idx, minlength=len(names)).argmax()
    out = a.copy()
    out[painted] = np.median(rest[idx == winner], axis=0)
    return out


def read(img: Image.Image | np.ndarray) -> Reading:
    """Everything the renderer controls, read back from the pixels (under any style)."""
    a = _unstyled(_array(img))
    bg, bg_rgb = background_of(a)
    mask = object_mask(a, bg_rgb)
    n = int(mask.sum())
    if n < 12:  # nothing there worth calling an object
        return Reading(bg, None, None, None, None, None, n)
    names, idx = _nearest(a[mask], _SHADES)
    labels = np.array(names)[idx]
    is_tint = np.char.endswith(labels, "+tint")
    base = np.char.replace(labels, "+tint", "")
    solid = base[~is_tint] if (~is_tint).sum() >= 0.15 * n else base
    colours, counts = np.unique(solid, return_counts=True)
    colour = str(colours[counts.argmax()])
    pattern = _pattern(a, mask, colour)
    ys, xs = np.nonzero(mask)
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    size = "large" if extent >= 27 else "small"
    cx = xs.mean()
    position = "left" if cx < 25 else ("right" if cx > 39 else "center")
    return Reading(bg, colour, _classify_shape(mask), pattern, size, position, n)


@lru_cache(maxsize=16)
def _signature_template(subject: Subject) -> tuple[np.ndarray, np.ndarray]:
    a = _array(render_subject(subject, "gray", "center", "large"))
    mask = object_mask(a, np.array(scenes.BACKGROUNDS["gray"], np.float32))
    rgb = _crop_norm(a, mask, Image.BOX)
    inside = _crop_norm(mask.astype(np.float32), mask, Image.BOX) > 0.99
    return rgb, inside


def signature_score(img: Image.Image | np.ndarray, subject: Subject) -> float:
    """Fraction of the subject's paint (two tones + marking, in the object's own frame)
    that the image's main object reproduces within a colour tolerance; 0 if no object."""
    a = _unstyled(_array(img))
    _, bg_rgb = background_of(a)
    mask = object_mask(a, bg_rgb)
    if mask.sum() < 12:
        return 0.0
    rgb = _crop_norm(a, mask, Image.BOX)
    t_rgb, inside = _signature_template(subject)
    close = np.linalg.norm(rgb - t_rgb, axis=-1) < 70.0
    return float(close[inside].mean())


def has_signature(img: Image.Image | np.ndarray, subject: Subject) -> bool:
    return signature_score(img, subject) >= SIGNATURE_THRESHOLD
