"""The toy world's DreamBooth subjects: specific objects the base model cannot draw from words.

Each subject is an instance of a known class (a star, a circle …) painted in two tones the
vocabulary has no words for, split along a fixed direction, with a small marking. Like the
DreamBooth paper's dog, it is "photographed" 3–6 times in varied contexts (background,
position, size), and written to disk as an ordinary image folder with a metadata.jsonl, so
it goes through exactly the same data path as a user's photos.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import types
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import scenes


@dataclasses.dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str  # a shape of the world
    tone_a: tuple[int, int, int]
    tone_b: tuple[int, int, int]
    split: str  # vertical | horizontal | diagonal
    mark: tuple[int, int, int]  # colour of the small central marking
    # (background, position, size) of each photo: varied contexts, never repeated
    photos: tuple[tuple[str, str, str], ...]

    def scene(self, background: str, position: str, size: str) -> scenes.Scene:
        """The scene a photo shows (the object's colour/pattern are placeholders: the
        subject's own paint replaces them)."""
        return scenes.Scene(background, (scenes.SceneObject(self.class_noun, "red", "plain", size, position),))


# The tones are palette colours on purpose: the toy VAE only ever saw those, and a subject it
# cannot even reconstruct could never be learned by fine-tuning the UNet (a first set of
# subjects in cyan/magenta/lime failed exactly so). What is new to the base is the paint
# job: two tones split along a line, and a central mark; its objects are always one colour.
_C = scenes.OBJECT_COLOURS
_BLACK, _WHITE = (20, 20, 20), (245, 245, 245)
SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject("duo_star", "star", _C["yellow"], _C["purple"], "vertical", _BLACK,
                (("white", "left", "large"), ("gray", "center", "large"), ("blue", "right", "large"),
                 ("green", "center", "small"), ("black", "left", "small"))),
        Subject("ringed_circle", "circle", _C["red"], _C["blue"], "horizontal", _WHITE,
                (("white", "center", "large"), ("gray", "right", "small"), ("yellow", "left", "large"),
                 ("green", "center", "small"))),
        Subject("split_square", "square", _C["green"], _C["orange"], "diagonal", _BLACK,
                (("white", "right", "large"), ("gray", "left", "small"), ("blue", "center", "large"),
                 ("black", "center", "large"), ("yellow", "right", "small"), ("gray", "left", "large"))),
        Subject("eyed_heart", "heart", _C["blue"], _C["yellow"], "vertical", _WHITE,
                (("gray", "center", "large"), ("white", "right", "large"), ("green", "left", "small"))),
    )
}


def get(name: str) -> Subject:
    if name not in SUBJECTS:
        raise KeyError(f"unknown toy-world subject {name!r}; known subjects: {', '.join(SUBJECTS)}")
    return SUBJECTS[name]


def _body(subject: Subject, position: str, size: str, dx: int, dy: int) -> tuple[np.ndarray, float, float, float]:
    """The object's mask at the renderer's 4× supersampled scale, and its centre and radius."""
    o = scenes.SceneObject(subject.class_noun, "red", "plain", size, position, dx, dy)
    cx, cy, r = scenes.object_geometry(o)
    return np.asarray(scenes.shape_mask(subject.class_noun, cx, cy, r)) > 127, cx, cy, r


def subject_area(subject: Subject, position: str, size: str, dx: int = 0, dy: int = 0) -> float:
    """Share of the frame the subject covers in one photo (what a segmentation mask would say)."""
    return round(float(_body(subject, position, size, dx, dy)[0].mean()), 4)


def render_subject(subject: Subject, background: str, position: str, size: str, dx: int = 0,
                   dy: int = 0) -> Image.Image:
    """One 'photo' of the subject: its two tones and marking, at the given place."""
    big = scenes.SIZE * 4
    body, cx, cy, r = _body(subject, position, size, dx, dy)
    yy, xx = np.mgrid[0:big, 0:big]
    if subject.split == "vertical":
        side_a = xx < cx
    elif subject.split == "horizontal":
        side_a = yy < cy
    else:
        side_a = (xx - cx) < (yy - cy)
    img = np.empty((big, big, 3), np.uint8)
    img[:] = scenes.BACKGROUNDS[background]
    img[body & side_a] = subject.tone_a
    img[body & ~side_a] = subject.tone_b
    canvas = Image.fromarray(img)
    d = ImageDraw.Draw(canvas)
    m = 0.22 * r
    d.ellipse([cx - m, cy - m + 0.1 * r, cx + m, cy + m + 0.1 * r], fill=subject.mark)
    return canvas.resize((scenes.SIZE, scenes.SIZE), Image.BOX)


def contexts(subject: Subject, n: int | None = None) -> list[tuple[str, str, str]]:
    """The subject's own photo contexts, extended (for data-amount experiments) by further
    (background, position, size) combinations in a fixed shuffled order."""
    import random

    own = list(subject.photos)
    if n is None or n <= len(own):
        return own[: n or len(own)]
    # a background in one of the subject's tones would swallow half of it
    bgs = [b for b, rgb in scenes.BACKGROUNDS.items() if rgb not in (subject.tone_a, subject.tone_b)]
    rest = [(b, p, s) for b in bgs for p in scenes.POSITIONS for s in scenes.SIZES if (b, p, s) not in own]
    random.Random(subject.name).shuffle(rest)
    return own + rest[: n - len(own)]


def photos(subject: Subject, n: int | None = None) -> list[tuple[Image.Image, dict]]:
    """The subject's photo set with each photo's record (what a captioner would say)."""
    out = []
    for k, (bg, pos, size) in enumerate(contexts(subject, n)):
        dx, dy = (k % 3) - 1, (k % 2) * 2 - 1
        record = {"subject": subject.name, "class_noun": subject.class_noun, "background": bg,
                  "position": pos, "size": size, "subject_area": subject_area(subject, pos, size, dx, dy)}
        out.append((render_subject(subject, bg, pos, size, dx, dy), record))
    return out


@functools.lru_cache(maxsize=16)
def folder_files(subject: Subject, n: int | None = None) -> Mapping[str, bytes]:
    """The subject's folder as file name → bytes: 01.png … and metadata.jsonl (file_name +
    record per line). Rendering is deterministic, so this is also what the run hash
    fingerprints for a `toyworld:` spec; cached because every params load asks for it."""
    shots = photos(subject, n)
    files = {}
    for k, (img, _) in enumerate(shots, start=1):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        files[f"{k:02d}.png"] = buf.getvalue()
    lines = [json.dumps({"file_name": f"{k:02d}.png", **rec}) for k, (_, rec) in enumerate(shots, start=1)]
    files["metadata.jsonl"] = ("\n".join(lines) + "\n").encode()
    return types.MappingProxyType(files)


def write_folder(subject: Subject, folder: Path, n: int | None = None) -> Path:
    """Write :func:`folder_files` into `folder`. Files that already hold exactly these bytes
    are left alone; any other (from an older dbkit, or edited by hand) is rewritten: the
    folder is ours, not the user's, and must hold what its spec's fingerprint describes."""
    from ..files import sync_folder

    return sync_folder(folder, folder_files(subject, n))  # metadata.jsonl last
