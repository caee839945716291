"""DreamBooth metrics: subject fidelity, prompt fidelity, PRES (language drift) and DIV.

The DreamBooth paper's four numbers, computed on the toy world by the oracle, exactly:
- subject fidelity: share of "a {subject} …" generations that carry the subject's
  signature (and the mean signature score);
- prompt fidelity: share of the attributes a prompt asks for (background, position,
  size) that the generation shows;
- PRES: share of plain class-noun generations ("a star") that carry the subject's
  signature: the class drifting toward the subject; lower is better;
- DIV: mean pairwise distance between generations of one prompt (mean absolute pixel
  difference, 0–1); higher is better.
Every number is reported with its backend and scale, so toy numbers are never mistaken for
CLIP/DINO ones.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
from PIL import Image

from .toyworld import oracle, scenes
from .toyworld.subjects import Subject

BACKEND = "toy-oracle"

# Toy analogues of the DreamBooth benchmark's recontextualisation prompts: each asks for a
# context the oracle can check.
TOY_TEMPLATES = [
    ("a {subject} on a {bg} background, {pos_phrase}", ("background", "position")),
    ("a {size} {subject} on a {bg} background", ("background", "size")),
    ("a {subject}, {pos_phrase}", ("position",)),
    ("a {subject} on a {bg} background", ("background",)),
]


def toy_prompts(subject_phrase: str, n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """`n` recontextualisation prompts with the attributes each requests, deterministic."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        template, asks = TOY_TEMPLATES[k % len(TOY_TEMPLATES)]
        want = {"background": rng.choice(list(scenes.BACKGROUNDS)), "position": rng.choice(scenes.POSITIONS),
                "size": rng.choice(scenes.SIZES)}
        text = template.format(subject=subject_phrase, bg=want["background"], size=want["size"],
                               pos_phrase=scenes.POSITION_PHRASES[want["position"]])
        out.append((text, {k: want[k] for k in asks}))
    return out


def signature_rate(images: list[Image.Image], subject: Subject) -> float:
    return float(np.mean([oracle.has_signature(im, subject) for im in images])) if images else 0.0


def mean_signature(images: list[Image.Image], subject: Subject) -> float:
    return float(np.mean([oracle.signature_score(im, subject) for im in images])) if images else 0.0


def prompt_fidelity(images: list[Image.Image], wants: list[dict]) -> float:
    """Share of requested attributes realised, over all images."""
    hits, total = 0, 0
    for im, want in zip(images, wants):
        r = oracle.read(im).as_dict()
        for key, value in want.items():
            hits += r.get(key) == value
            total += 1
    return hits / total if total else 0.0


def diversity(images: list[Image.Image]) -> float:
    """Mean pairwise mean-absolute pixel difference (0–1)."""
    arrs = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im, np.float32) / 255.0 for im in images]
    if len(arrs) < 2:
        return 0.0
    return float(np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(arrs, 2)]))


def evaluate(generate, subject: Subject, subject_phrase: str, class_noun: str, *, seeds: list[int],
             n_prompts: int = 8) -> dict:
    """All four metrics for one model. `generate(prompts, seeds) -> images` (prompt-major)."""
    prompts = toy_prompts(subject_phrase, n_prompts)
    ctx = generate([t for t, _ in prompts], seeds)
    wants = [w for _, w in prompts for _ in seeds]
    plain = generate([f"a {subject_phrase}"], seeds)
    klass = generate([f"a {class_noun}"], seeds)
    return {
        "subject_fidelity": signature_rate(plain + ctx, subject),
        "signature_score": mean_signature(plain + ctx, subject),
        "prompt_fidelity": prompt_fidelity(ctx, wants),
        "pres": signature_rate(klass, subject),
        "div": diversity(klass),
        "div_subject": diversity(plain),
        "backend": BACKEND,
        "n_images": len(ctx) + len(plain) + len(klass),
    }


METRIC_INFO = {
    "subject_fidelity": "share of subject prompts showing the subject's signature (0–1, higher better)",
    "signature_score": "mean signature score of subject prompts (0–1, higher better)",
    "prompt_fidelity": "share of requested background/position/size realised (0–1, higher better)",
    "pres": "share of class-noun images showing the subject: language drift (0–1, lower better)",
    "div": "mean pairwise pixel distance of class-noun images (0–1, higher better)",
    "div_subject": "mean pairwise pixel distance of subject images (0–1)",
}
