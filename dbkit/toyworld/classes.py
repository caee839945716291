"""Real class images of the toy world: the renderer's own pictures of ordinary objects of a class.

DreamBooth's prior preservation needs pictures of the subject's class. dbkit generates them
with the frozen base by default; the alternative, real photos of the class, is in the toy
world a folder of rendered scenes whose object has that shape — any colour, pattern, size,
position and background the world has, but never a subject's paint job (the oracle checks
every picture against every subject of the class, and such a picture is redrawn).
`toyworld:class:<shape>[@n]` in `data.class_images` names such a folder.
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

from PIL import Image

from . import oracle, scenes, subjects

DEFAULT_N = 32  # class images when the spec gives no @n (prior.num_images' default)


def caption(shape: str) -> str:
    """What each class image shows, as prior.class_prompt's default "a {class_noun}" says it."""
    return f"a {shape}"


def _check_shape(shape: str) -> None:
    if shape not in scenes.SHAPES:
        raise KeyError(f"unknown toy-world class {shape!r}; known shapes: {', '.join(scenes.SHAPES)}")


def _acceptable(img: Image.Image, shape: str) -> bool:
    """Read back as the class, and no subject of that class: a picture the oracle would
    count as the subject would teach the prior the very thing it should hold apart."""
    if oracle.read(img).shape != shape:
        return False
    return not any(oracle.has_signature(img, s) for s in subjects.SUBJECTS.values() if s.class_noun == shape)


def class_scenes(shape: str, n: int | None = None) -> list[tuple[scenes.Scene, Image.Image]]:
    """n scenes of one ordinary object of `shape` with their renders, drawn from a stream
    seeded by the shape (so `@32` is the first 32 of `@96`). Held-out combinations are left
    out: pretraining never saw them, and the acceptance prompts test composition on them."""
    _check_shape(shape)
    rng = random.Random(f"toyworld:class:{shape}")
    out: list[tuple[scenes.Scene, Image.Image]] = []
    while len(out) < (n or DEFAULT_N):
        o = dataclasses.replace(scenes.random_object(rng), shape=shape)
        scene = scenes.Scene(rng.choice([b for b in scenes.BACKGROUNDS if b != o.colour]), (o,))
        if scenes.is_held_out(scene):
            continue
        img = scenes.render(scene)
        if _acceptable(img, shape):
            out.append((scene, img))
    return out


@functools.lru_cache(maxsize=16)
def folder_files(shape: str, n: int | None = None) -> Mapping[str, bytes]:
    """The class folder as file name → bytes: 001.png … and metadata.jsonl (file_name, the
    caption as `text`, as generated class images record it, and the scene). Deterministic,
    so this is also what the run hash fingerprints; cached because every params load asks."""
    shots = class_scenes(shape, n)
    files, lines = {}, []
    for k, (scene, img) in enumerate(shots, start=1):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        files[f"{k:03d}.png"] = buf.getvalue()
        lines.append(json.dumps({"file_name": f"{k:03d}.png", "text": caption(shape), "class_noun": shape,
                                 **scene.record()}))
    files["metadata.jsonl"] = ("\n".join(lines) + "\n").encode()
    return types.MappingProxyType(files)


def write_folder(shape: str, folder: Path, n: int | None = None) -> Path:
    """Write :func:`folder_files` into `folder`; files already holding these bytes are left
    alone, any other is rewritten (the folder is ours and must match its fingerprint)."""
    from ..files import sync_folder

    return sync_folder(folder, folder_files(shape, n))  # metadata.jsonl last
