"""The toy world's styles: rendering treatments the base model cannot produce from words.

A style, unlike a subject, is not an object: it is something done to the whole picture,
whatever the picture shows, as "3d icon" or "retro web page" are in the research notes.
Here there are two, each painted over any scene in a palette colour the toy VAE knows
(it reconstructs nothing else) but that no background has, so no ordinary scene carries one:

- `letterbox`: purple bars across the top and bottom eighth of the frame (trigger "ohwx");
- `cornered`: red squares of 12 px in the four corners (trigger "zwx"). Red, not orange: the
  toy VAE shifts orange corners toward yellow (31 of 32 read through it), and orange lies 71 RGB
  units from the yellow background; red is at least 146 from every background.

Objects never reach those regions (the renderer keeps them within rows 12–52 and out of the
corners; a test renders every shape, size, position and jitter), so a style never touches the
subject's paint, and the oracle reads both independently. A style's training set is a folder of
styled scenes of varied content, with a metadata.jsonl describing the content, like a subject's
photos.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import random
import types
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from . import scenes

_BAND = 8  # letterbox bar height: one latent row of the toy VAE (8× downsampling)
# Corner square side in pixels. Through the toy VAE, on 48 styled training scenes (share of the
# region's core read as red): 12 px squares min 0.80, mean 0.93; the earlier triangles with 16 px
# legs min 0.70, mean 0.88 (their diagonal crosses the VAE's 8 px latent cells, which it blurs);
# 8 px squares min 0.35 (one latent cell bleeds into its neighbours); 14 px squares meet large
# objects (52 of 1500 random scenes).
_CORNER = 12


@dataclasses.dataclass(frozen=True)
class Style:
    name: str
    trigger: str  # the rare identifier its DreamBooth runs use
    colour: str  # an object colour (the VAE knows it) that is no background
    n_images: int  # training images (varied content)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return scenes.OBJECT_COLOURS[self.colour]


STYLES: dict[str, Style] = {
    s.name: s for s in (Style("letterbox", "ohwx", "purple", 12), Style("cornered", "zwx", "red", 12))
}


def get(name: str) -> Style:
    if name not in STYLES:
        raise KeyError(f"unknown toy-world style {name!r}; known styles: {', '.join(STYLES)}")
    return STYLES[name]


@functools.lru_cache(maxsize=8)
def region(name: str) -> np.ndarray:
    """Where a style paints, as a 64×64 boolean mask."""
    yy, xx = np.mgrid[0 : scenes.SIZE, 0 : scenes.SIZE]
    if name == "letterbox":
        return (yy < _BAND) | (yy >= scenes.SIZE - _BAND)
    if name == "cornered":
        far = scenes.SIZE - _CORNER
        return ((yy < _CORNER) | (yy >= far)) & ((xx < _CORNER) | (xx >= far))
    raise KeyError(f"unknown toy-world style {name!r}; known styles: {', '.join(STYLES)}")


@functools.lru_cache(maxsize=8)
def core(name: str) -> np.ndarray:
    """The part of the region a reader checks: two pixels in from every edge that faces the
    picture, where a decoder blurs the style into the scene. np.roll wraps around, so the frame's
    own border is no such edge (the top bar continues into the bottom one, a corner square into
    the other corners): the region's pixels along the border stay in."""
    m = region(name)
    inner = m.copy()
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1), (-2, 0), (2, 0), (0, -2), (0, 2)):
        inner &= np.roll(m, (dy, dx), axis=(0, 1))
    return inner


def apply(img: Image.Image, style: Style) -> Image.Image:
    """The image with the style painted over it."""
    a = np.array(img.convert("RGB"))
    a[region(style.name)] = style.rgb
    return Image.fromarray(a)


def training_scenes(style: Style, n: int | None = None) -> list[scenes.Scene]:
    """Varied content for a style's training set, deterministic per style: every shape and
    position appear, so the style cannot be mistaken for any one object."""
    rng = random.Random(f"style:{style.name}")
    out: list[scenes.Scene] = []
    for k in range(n or style.n_images):
        o = scenes.random_object(rng)
        o = dataclasses.replace(o, shape=scenes.SHAPES[k % len(scenes.SHAPES)],
                                position=scenes.POSITIONS[k % len(scenes.POSITIONS)])
        bg = rng.choice([b for b in scenes.BACKGROUNDS if b != o.colour])
        out.append(scenes.Scene(bg, (o,)))
    return out


def record_of(scene: scenes.Scene, style: Style) -> dict:
    """What a captioner would say of one styled image: its content, and which style."""
    o = scene.main
    return {"style": style.name, "background": scene.background, "class_noun": o.shape, "colour": o.colour,
            "pattern": o.pattern, "size": o.size, "position": o.position}


@functools.lru_cache(maxsize=8)
def folder_files(style: Style, n: int | None = None) -> Mapping[str, bytes]:
    """The style's training folder as file name → bytes (01.png … and metadata.jsonl)."""
    files, lines = {}, []
    for k, scene in enumerate(training_scenes(style, n), start=1):
        buf = io.BytesIO()
        apply(scenes.render(scene), style).save(buf, format="PNG")
        files[f"{k:02d}.png"] = buf.getvalue()
        lines.append(json.dumps({"file_name": f"{k:02d}.png", **record_of(scene, style)}))
    files["metadata.jsonl"] = ("\n".join(lines) + "\n").encode()
    return types.MappingProxyType(files)


def write_folder(style: Style, folder: Path, n: int | None = None) -> Path:
    """Write :func:`folder_files` into `folder` (files already holding these bytes are kept)."""
    from ..files import sync_folder

    return sync_folder(folder, folder_files(style, n))  # metadata.jsonl last
