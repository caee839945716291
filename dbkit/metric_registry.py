"""Every metric dbkit reports, in one table: its name, what it means and which way is better
(its legend), whether it is a rate over images, and where it is shown.

The metrics tables (column order and legend), the index's all-runs table, the ranking, the
steps curve's intervals and `dbkit checkpoints --metrics` read this table; the functions that
compute the values live in dbkit/metrics.py (the toy world's oracle) and
dbkit/metric_backends.py (real models: DINO, CLIP). Adding a metric is one entry here plus
the function that computes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    legend: str  # one line for a metrics table's legend (toy world's oracle backend), with its direction
    # a rate: the images it is a share of, per evaluation seed, in each toy evaluation that
    # computes it (subject | style | combination: dbkit.metrics.evaluate*); its Wilson
    # interval in tables and its band on the steps curve come from this
    per_seed: Mapping[str, int] = dataclasses.field(default_factory=dict)
    key: bool = False  # a column of the index's all-runs table and of `dbkit checkpoints --metrics`
    real_legend: str = ""  # the real-model backend's meaning, where it shares the name (pres, div)

    @property
    def rate(self) -> bool:
        return bool(self.per_seed)


# Table order is column order in every metrics table; names not listed follow in order of appearance.
METRICS: tuple[Metric, ...] = (
    Metric("subject_fidelity", "share of subject prompts showing the subject's signature (0–1, higher better)",
           per_seed={"subject": 9, "combination": 8}, key=True),  # 8 context prompts + the bare one
    Metric("recontext_fidelity", "share of recontextualisation prompts (a new background, position or size) "
           "showing the subject's signature: the paper's subject fidelity over its context prompts (0–1, higher "
           "better; against subject_fidelity, a model that keeps the subject only on the bare prompt)",
           per_seed={"subject": 8}),
    Metric("style_rate", "share of style-trigger prompts showing the style (0–1, higher better)",
           per_seed={"style": 8, "combination": 8}),
    Metric("both_rate", "share of subject-and-style prompts showing both (0–1, higher better)",
           per_seed={"combination": 8}),
    Metric("product", "subject fidelity × style rate on subject-and-style prompts (0–1, higher better)"),
    Metric("signature_score", "mean signature score of subject prompts (0–1, higher better)"),
    Metric("style_score", "mean share of the style's region painted in its colour (0–1)"),
    Metric("prompt_fidelity", "share of requested background/position/size realised (0–1, higher better)",
           key=True),
    Metric("pres", "share of class-noun images showing the subject: language drift (0–1, lower better)",
           per_seed={"subject": 1, "combination": 2}, key=True,
           real_legend="mean DINO (or CLIP-I) cosine, class-noun images vs real subject (language drift, "
           "lower better)"),
    Metric("style_drift", "share of prompts without the style trigger showing the style (0–1, lower better)",
           per_seed={"style": 8, "combination": 2}),
    Metric("div", "mean pairwise pixel distance of class-noun images (0–1, higher better)", key=True,
           real_legend="mean pairwise lpips-vit distance within a subject prompt (diversity, higher better)"),
    Metric("div_subject", "mean pairwise pixel distance of subject images (0–1)"),
    Metric("background_leak", "share of bare subject-prompt images on a background of its photos "
           "(0–1, lower = less leak)", per_seed={"subject": 1}),
    Metric("plain_prompt_fidelity", "prompt fidelity of the same prompts without the style trigger (0–1)"),
    Metric("dino", "", real_legend="mean DINO cosine, generated vs real subject images (subject fidelity, "
           "higher better)"),
    Metric("clip_i", "", real_legend="mean CLIP image cosine, generated vs real subject images (subject "
           "fidelity, higher better)"),
    Metric("clip_t", "", real_legend="mean CLIP image-text cosine with the prompt (prompt fidelity, higher better)"),
    Metric("div_class", "", real_legend="mean pairwise lpips-vit distance within a class-noun prompt "
           "(higher better)"),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}

# What ranks a run, first present wins: the toy world's subject, then its style, then real models' DINO.
RANKING = ("subject_fidelity", "style_rate", "dino")
# Columns of a metrics table that describe the evaluation rather than measure the model.
NOT_METRICS = ("backend", "n_images")

KEY_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.key)
RATES: tuple[str, ...] = tuple(m.name for m in METRICS if m.rate)


def ordered(names: Iterable[str]) -> list[str]:
    """`names` in table order: registered metrics first, in METRICS' order, then the rest as given."""
    names = list(dict.fromkeys(names))
    order = {m.name: i for i, m in enumerate(METRICS)}
    return sorted((n for n in names if n in order), key=order.__getitem__) + [n for n in names if n not in order]


def legend(name: str, backend: str | None = None) -> str:
    """The metric's one-line meaning under this backend ("" when unknown)."""
    m = BY_NAME.get(name)
    if m is None:
        return ""
    real = backend not in (None, "toy-oracle", "oracle")
    return (m.real_legend or m.legend) if real else (m.legend or m.real_legend)


def rank_metric(metrics: Mapping) -> str:
    """The metric a run's table is ranked by."""
    return next((k for k in RANKING if k in metrics), RANKING[-1])
