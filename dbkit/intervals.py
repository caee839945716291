"""How sure a measured rate is: Wilson 95% intervals, and intervals for a difference of two.

The toy oracle's metrics are mostly *rates*: the share of n images (or requested attributes)
showing something. With the notes' 8 images per prompt, ``pres`` and ``background_leak`` are
rates over 8 images, so 7/8 against 6/8 is noise; subject fidelity is over 72. A figure
without its interval invites reading noise as a finding, so tables, plots and conclusions show
one. Wilson's score interval (not the normal one) because it stays inside [0, 1] and is honest
at 0/n and n/n, where the notes' rates often sit. A difference of two rows uses Newcombe's
hybrid score interval (method 10 of Newcombe 1998), built from the two Wilson intervals.

What these intervals cover: **evaluation sampling only**, each image (prompt fidelity: each
requested attribute) counted as an independent trial of one trained model. They say nothing of
training variance (each row is one training; the thread count alone moved some notes rows by
more than these intervals), images of one seed share their noise, one broken image fails all
its attributes (so the intervals are somewhat narrow), and two rows are drawn from the same
prompts and seeds while Newcombe's interval treats them as independent (which widens it where
the rows agree image by image). "Within noise" therefore means "not even evaluation sampling
rules it out"; a difference outside it is one trained model against another, not an
established effect. Both are a few lines of closed-form arithmetic; scipy/statsmodels would add a
dependency for that alone.

Which metrics are rates, and over how many, follows from how :mod:`dbkit.metrics` draws
them (prompt-major, ``num_per_prompt`` seeds per prompt, 8 prompts): :func:`denominators`.
Continuous scores (signature score, DIV, CLIP/DINO similarities) get no interval here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from . import metric_registry

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(rate: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``rate`` observed over ``n`` trials."""
    if n <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denom
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def difference(p1: float, n1: int, p2: float, n2: int, z: float = Z95) -> tuple[float, float, float]:
    """``(p1 - p2, low, high)``: Newcombe's hybrid score interval of a difference of two
    proportions, treated as independent samples (see the module docstring)."""
    l1, u1 = wilson(p1, n1, z)
    l2, u2 = wilson(p2, n2, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return (d, max(-1.0, low), min(1.0, high))


# Per metric, the images it is a rate over per seed, for each kind of evaluation in
# dbkit.metrics, is its `per_seed` in dbkit.metric_registry. prompt_fidelity counts requested
# attributes, computed from the prompts themselves (:func:`_attributes`).
# The number of images each kind draws per seed (metrics.evaluate*'s n_images / S)
_IMAGES_PER_SEED = {"subject": 10, "style": 16, "combination": 10}


def kind(metrics: Mapping[str, Any]) -> str | None:
    """Which evaluation made these metrics: subject, style, combination, or None (CLIP/DINO
    backends, merges' own tables: no rates this module knows)."""
    if metrics.get("backend") not in (None, "toy-oracle"):
        return None
    if "both_rate" in metrics:
        return "combination"
    if "style_rate" in metrics:
        return "style"
    return "subject" if "subject_fidelity" in metrics else None


def _attributes(which: str) -> int:
    """Requested attributes over the 8 prompts of one seed (prompt fidelity's denominator)."""
    from . import metrics as m

    prompts = m.content_prompts(8) if which == "style" else m.toy_prompts("x", 8)
    return sum(len(want) for _, want in prompts)


def denominators(metrics: Mapping[str, Any]) -> dict[str, int]:
    """``{metric: n}`` for the rate metrics of one row (from its ``n_images``); {} when the row
    holds no known rates."""
    k = kind(metrics)
    images = metrics.get("n_images")
    if k is None or not isinstance(images, int) or images % _IMAGES_PER_SEED[k]:
        return {}
    seeds = images // _IMAGES_PER_SEED[k]
    out = {m.name: m.per_seed[k] * seeds for m in metric_registry.METRICS if k in m.per_seed and m.name in metrics}
    for name in ("prompt_fidelity", "plain_prompt_fidelity"):
        if name in metrics:
            out[name] = _attributes("style" if k == "style" else "subject") * seeds
    return out


def interval(metrics: Mapping[str, Any], name: str) -> tuple[float, float] | None:
    """The Wilson 95% interval of one metric of a row, or None when it is not a known rate."""
    n = denominators(metrics).get(name)
    value = metrics.get(name)
    if n is None or not isinstance(value, (int, float)):
        return None
    return wilson(float(value), n)


def fmt(value: float, ci: tuple[float, float] | None, digits: int = 2) -> str:
    """``0.96 [0.88, 0.99]``: a value with its interval, or the value alone."""
    text = f"{value:.{digits}f}"
    return text if ci is None else f"{text} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
