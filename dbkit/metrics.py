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

import dataclasses
import itertools
import random
from collections.abc import Callable

import numpy as np
from PIL import Image

from .toyworld import oracle, scenes
from .toyworld.styles import Style
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


def background_leak(images: list[Image.Image], subject: Subject) -> float:
    """Share of bare-prompt images ("a sks heart") drawn on one of the backgrounds the
    subject's own photos were taken on: a model that learned the photos, not only the subject,
    repeats their backgrounds. Compare with the base (the backgrounds it draws unprompted)."""
    seen = {bg for bg, _, _ in subject.photos}
    return float(np.mean([oracle.read(im).background in seen for im in images])) if images else 0.0


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


@dataclasses.dataclass(frozen=True)
class SubjectImages:
    """What a subject evaluation draws: the bare prompt ("a sks heart"), the context prompts
    with the attributes each asks for, and the class noun alone, each over every seed."""

    subject: Subject
    plain: list[Image.Image]
    ctx: list[Image.Image]
    wants: list[dict]
    klass: list[Image.Image]


# A subject model's metrics, each a function of the drawn images (name and meaning in
# dbkit/metric_registry.py); a new one is one entry here and one there.
SUBJECT_METRICS: dict[str, Callable[[SubjectImages], float]] = {
    "subject_fidelity": lambda d: signature_rate(d.plain + d.ctx, d.subject),
    "signature_score": lambda d: mean_signature(d.plain + d.ctx, d.subject),
    "prompt_fidelity": lambda d: prompt_fidelity(d.ctx, d.wants),
    "pres": lambda d: signature_rate(d.klass, d.subject),
    "div": lambda d: diversity(d.klass),
    "div_subject": lambda d: diversity(d.plain),
    "background_leak": lambda d: background_leak(d.plain, d.subject),
    "recontext_fidelity": lambda d: signature_rate(d.ctx, d.subject),
}


def evaluate(generate, subject: Subject, subject_phrase: str, class_noun: str, *, seeds: list[int],
             n_prompts: int = 8) -> dict:
    """Every SUBJECT_METRICS entry for one model. `generate(prompts, seeds) -> images` (prompt-major)."""
    prompts = toy_prompts(subject_phrase, n_prompts)
    ctx = generate([t for t, _ in prompts], seeds)
    wants = [w for _, w in prompts for _ in seeds]
    plain = generate([f"a {subject_phrase}"], seeds)
    klass = generate([f"a {class_noun}"], seeds)
    drawn = SubjectImages(subject, plain, ctx, wants, klass)
    return {name: f(drawn) for name, f in SUBJECT_METRICS.items()} | {
        "backend": BACKEND, "n_images": len(ctx) + len(plain) + len(klass)}


def content_prompts(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """`n` prompts describing ordinary scenes fully (shape, colour, background, position,
    size), with the attributes each requests: what a style is asked to dress, deterministic."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        o = scenes.random_object(rng)
        bg = rng.choice([b for b in scenes.BACKGROUNDS if b != o.colour])
        text = f"a {o.size} {o.colour} {o.shape} on a {bg} background, {scenes.POSITION_PHRASES[o.position]}"
        out.append((text, {"shape": o.shape, "colour": o.colour, "background": bg, "position": o.position,
                           "size": o.size}))
    return out


def style_rate(images: list[Image.Image], style: Style) -> float:
    return float(np.mean([oracle.has_style(im, style) for im in images])) if images else 0.0


def evaluate_style(generate, style: Style, style_phrase: str, *, seeds: list[int], n_prompts: int = 8) -> dict:
    """A style model's numbers: how often the trigger brings the style (style rate), whether
    the content still follows the prompt, and drift: the style leaking into prompts that do
    not ask for it. `generate(prompts, seeds) -> images` (prompt-major)."""
    prompts = content_prompts(n_prompts)
    styled = generate([f"{t}, {style_phrase}" for t, _ in prompts], seeds)
    plain = generate([t for t, _ in prompts], seeds)
    wants = [w for _, w in prompts for _ in seeds]
    return {
        "style_rate": style_rate(styled, style),
        "style_score": float(np.mean([oracle.style_score(im, style) for im in styled])),
        "prompt_fidelity": prompt_fidelity(styled, wants),
        "style_drift": style_rate(plain, style),
        "plain_prompt_fidelity": prompt_fidelity(plain, wants),
        "div": diversity(styled),
        "backend": BACKEND,
        "n_images": len(styled) + len(plain),
    }


def evaluate_combination(generate, subject: Subject, subject_phrase: str, style: Style, style_phrase: str, *,
                         seeds: list[int], n_prompts: int = 8) -> dict:
    """A subject and a style asked for together ("a sks heart on a gray background, zwx
    style"): each one's rate, the share of images with both, and drift on prompts that name
    neither (the class noun alone: does it turn into the subject, or take the style?)."""
    prompts = toy_prompts(subject_phrase, n_prompts)
    both = generate([f"{t}, {style_phrase}" for t, _ in prompts], seeds)
    klass = generate([t.replace(subject_phrase, subject.class_noun) for t, _ in prompts[:2]], seeds)
    subj = [oracle.has_signature(im, subject) for im in both]
    sty = [oracle.has_style(im, style) for im in both]
    rates = {"subject_fidelity": float(np.mean(subj)), "style_rate": float(np.mean(sty))}
    return rates | {
        "both_rate": float(np.mean([a and b for a, b in zip(subj, sty)])),
        "product": rates["subject_fidelity"] * rates["style_rate"],
        "prompt_fidelity": prompt_fidelity(both, [w for _, w in prompts for _ in seeds]),
        "pres": signature_rate(klass, subject),
        "style_drift": style_rate(klass, style),
        "backend": BACKEND,
        "n_images": len(both) + len(klass),
    }
