"""Procedural 64×64 scenes of the toy world, with exact captions in sentence and tag form.

A scene is one object (optionally a second) with a shape, a colour, a pattern, a size and
a position, on a plain coloured background. The renderer draws it at 4× resolution and
box-filters down, so edges look like a photo's rather than a pixel-art sprite's.
Everything the renderer controls is recorded in :class:`Scene`, which is what the oracle
(``oracle.py``) reads back and what captions are generated from.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
_SS = 4  # supersampling factor for antialiased edges

SHAPES = ("circle", "square", "triangle", "star", "heart")
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "blue": OBJECT_COLOURS["blue"],
    "green": OBJECT_COLOURS["green"],
    "yellow": OBJECT_COLOURS["yellow"],
}
PATTERNS = ("plain", "striped", "dotted")
SIZES = ("small", "large")
POSITIONS = ("left", "center", "right")
POSITION_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}
_RADIUS = {"small": 10, "large": 17}
_X = {"left": 17, "center": 32, "right": 47}


def tint(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The lighter shade a pattern (stripes, dots) is drawn in: half-way to white."""
    return tuple((c + 255) // 2 for c in rgb)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    pattern: str = "plain"
    size: str = "large"
    position: str = "center"
    dx: int = 0  # small jitter in pixels, so positions are regions, not points
    dy: int = 0


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    @property
    def main(self) -> SceneObject:
        return self.objects[0]

    def record(self) -> dict:
        """The structured attributes of the scene, as JSON-ready data."""
        return {"background": self.background, "objects": [dataclasses.asdict(o) for o in self.objects]}


def _object_phrase(o: SceneObject, noun: str | None = None) -> str:
    words = [o.size, o.colour, o.pattern, noun or o.shape]
    return "a " + " ".join(words)


def caption_sentence(scene: Scene, noun: str | None = None) -> str:
    """The sentence caption, e.g. 'a large red striped star on a blue background, on the left'.

    `noun` replaces the main object's description (e.g. 'sks star' for a subject photo).
    """
    main = scene.main
    first = f"a {noun}" if noun else _object_phrase(main)
    text = f"{first} on a {scene.background} background, {POSITION_PHRASES[main.position]}"
    for other in scene.objects[1:]:
        text += f", and {_object_phrase(other)} {POSITION_PHRASES[other.position]}"
    return text


def caption_tags(scene: Scene, noun: str | None = None) -> list[str]:
    """The tag caption, as kohya-style taggers write it: 'star, red, striped, blue background, left'."""
    main = scene.main
    tags = [noun] if noun else [main.shape, main.colour, main.pattern, main.size]
    tags += [f"{scene.background} background", main.position]
    for other in scene.objects[1:]:
        tags += [other.shape, other.colour, other.pattern, other.size, other.position]
    return tags


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Outline in unit coordinates (radius 1, y down) for the polygon shapes."""
    if shape == "square":
        s = 0.85
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        return [(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    if shape == "heart":
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x / 17.0, (y + 2.5) / 17.0))
        return pts
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int = SIZE * _SS) -> Image.Image:
    """A binary ('L') mask of one shape at the given centre and radius, in a size×size canvas."""
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    if shape == "circle":
        d.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    else:
        d.polygon([(cx + radius * x, cy + radius * y) for x, y in _unit_polygon(shape)], fill=255)
    return mask


def pattern_mask(pattern: str, size: int = SIZE * _SS) -> Image.Image | None:
    """Where the lighter pattern shade goes: horizontal stripes or a grid of dots."""
    if pattern == "plain":
        return None
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    period = 6 * _SS
    if pattern == "striped":
        for y in range(0, size, period):
            d.rectangle([0, y, size, y + period // 2 - 1], fill=255)
    elif pattern == "dotted":
        r = 1.6 * _SS
        for y in range(period // 2, size, period):
            for x in range(period // 2, size, period):
                d.ellipse([x - r, y - r, x + r, y + r], fill=255)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; known patterns: {', '.join(PATTERNS)}")
    return mask


def object_geometry(o: SceneObject) -> tuple[float, float, float]:
    """Centre x, centre y and radius of an object, in supersampled pixels."""
    return (_X[o.position] + o.dx) * _SS, (32 + o.dy) * _SS, _RADIUS[o.size] * _SS


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a 64×64 RGB image."""
    big = SIZE * _SS
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    for o in scene.objects:
        cx, cy, r = object_geometry(o)
        body = shape_mask(o.shape, cx, cy, r)
        rgb = OBJECT_COLOURS[o.colour]
        canvas.paste(Image.new("RGB", (big, big), rgb), (0, 0), body)
        pm = pattern_mask(o.pattern)
        if pm is not None:
            both = Image.fromarray((np.asarray(body) & np.asarray(pm)).astype(np.uint8))
            canvas.paste(Image.new("RGB", (big, big), tint(rgb)), (0, 0), both)
    return canvas.resize((SIZE, SIZE), Image.BOX)


def random_object(rng: random.Random, *, exclude_colour: str | None = None) -> SceneObject:
    colours = [c for c in OBJECT_COLOURS if c != exclude_colour]
    return SceneObject(
        shape=rng.choice(SHAPES),
        colour=rng.choice(colours),
        pattern=rng.choice(PATTERNS),
        size=rng.choice(SIZES),
        position=rng.choice(POSITIONS),
        dx=rng.randint(-2, 2),
        dy=rng.randint(-3, 3),
    )


def random_scene(rng: random.Random) -> Scene:
    """One object on a background of a different colour."""
    o = random_object(rng)
    bg = rng.choice([b for b in BACKGROUNDS if b != o.colour])
    return Scene(bg, (o,))


def combo_key(scene: Scene) -> tuple[str, str, str, str]:
    m = scene.main
    return (m.shape, m.colour, m.pattern, scene.background)


def is_held_out(scene: Scene) -> bool:
    """About one (shape, colour, pattern, background) combination in ten never appears in
    pretraining, so the acceptance prompts test composition, not recall. Deterministic."""
    import hashlib

    h = hashlib.sha256("|".join(combo_key(scene)).encode()).digest()
    return h[0] < 26


def scenes(seed: int, *, held_out: bool | None = False) -> Iterator[Scene]:
    """An endless stream of random single-object scenes; `held_out` picks the split
    (False: training combinations, True: held-out ones, None: both)."""
    rng = random.Random(seed)
    while True:
        s = random_scene(rng)
        if held_out is None or is_held_out(s) == held_out:
            yield s
