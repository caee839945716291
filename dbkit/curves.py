"""Curves across an experiment's runs: every variant's loss on one plot, metrics against steps
and where training stopped paying off (the plateau marker).

Metrics against steps come from ``checkpoint_metrics.jsonl`` in a run folder (one line per
evaluated checkpoint, written by ``dbkit checkpoints RUN --metrics``: the same evaluation as
``metrics.json``), with ``metrics.json`` as the final step's point. The training previews'
``steps_curve.jsonl`` (4 seeds, no prompt fidelity) stays on its own plot
(:func:`dbkit.report.plot_steps_curve`): mixing the two estimators would draw noise as a trend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import read_json
from .report import read_jsonl, smooth

CHECKPOINT_METRICS = "checkpoint_metrics.jsonl"


def plateau_step(points: Sequence[tuple[float, float | None, float | None]], *, eps: float = 0.02,
                 window: int = 2) -> float | None:
    """The first step where subject fidelity stops rising while prompt fidelity falls, or None.

    ``points``: (step, subject_fidelity, prompt_fidelity), any order; points missing either
    value are left out. At point i, subject fidelity has stopped rising when none of the next
    ``window`` points exceeds it by more than ``eps``, and prompt fidelity falls when the last
    of those points is more than ``eps`` below it. A point needs ``window`` points after it.
    (The defaults are ``report.plateau_eps`` and ``report.plateau_window`` in base.yaml.)
    """
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window}")
    pts = sorted((s, sf, pf) for s, sf, pf in points if sf is not None and pf is not None)
    for i in range(len(pts) - window):
        step, subject, prompt = pts[i]
        ahead = pts[i + 1:i + 1 + window]
        if max(a[1] for a in ahead) - subject <= eps + 1e-12 and prompt - ahead[-1][2] > eps + 1e-12:
            return step
    return None


def metric_points(rd: Path) -> list[dict]:
    """Metrics by step of one run: ``checkpoint_metrics.jsonl`` plus ``metrics.json`` at the
    last step (``train.steps`` from its params.yaml), sorted by step; [] when there are none."""
    import yaml

    rd = Path(rd)
    by_step = {r["step"]: r for r in read_jsonl(rd / CHECKPOINT_METRICS) if isinstance(r.get("step"), (int, float))}
    final = read_json(rd / "metrics.json")
    if by_step and isinstance(final, dict) and (rd / "params.yaml").is_file():
        params = yaml.safe_load((rd / "params.yaml").read_text(encoding="utf-8")) or {}
        steps = (params.get("train") or {}).get("steps")
        if isinstance(steps, int):
            by_step.setdefault(steps, {"step": steps, **final})
    return [by_step[s] for s in sorted(by_step)]


def _empty(ax: Any, text: str) -> None:
    # an empty plot that says why beats a failing cell: the report still renders
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _colors() -> list[str]:
    import matplotlib.pyplot as plt

    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def plot_variant_losses(runs: Sequence[tuple[str, Path]], key: str = "loss") -> Any:
    """Every run's ``train_log.jsonl`` loss against step on one plot (raw faint, smoothed bold),
    one colour per run; ``runs`` = (label, run folder). Returns the Figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    colors = _colors()
    drawn = 0
    for i, (label, rd) in enumerate(runs):
        pts = [(r["step"], r[key]) for r in read_jsonl(Path(rd) / "train_log.jsonl")
               if isinstance(r.get("step"), (int, float)) and isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        steps, vals = zip(*pts)
        color = colors[i % len(colors)]
        ax.plot(steps, vals, color=color, alpha=0.2, linewidth=0.7)
        ax.plot(steps, smooth(vals), color=color, linewidth=1.6, label=label)
        drawn += 1
    ax.set_xlabel("step")
    ax.set_ylabel(f"{key} (smoothed)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="upper right", fontsize="small")
    else:
        _empty(ax, f"no {key} logged in any run's train_log.jsonl")
    fig.tight_layout()
    return fig


def plot_variant_metrics(runs: Sequence[tuple[str, Path]], *, eps: float = 0.02, window: int = 2) -> Any:
    """Subject fidelity (solid) and prompt fidelity (dashed) against step for every run that has
    checkpoint metrics (:func:`metric_points`), one colour per run, with a dotted vertical line at
    each run's :func:`plateau_step`. Returns the Figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8))
    colors = _colors()
    drawn = 0
    for i, (label, rd) in enumerate(runs):
        pts = metric_points(rd)
        if not pts:
            continue
        color = colors[i % len(colors)]
        for key, style in (("subject_fidelity", "-"), ("prompt_fidelity", "--")):
            xy = [(p["step"], p[key]) for p in pts if isinstance(p.get(key), (int, float))]
            if xy:
                ax.plot(*zip(*xy), style, color=color, marker="o", markersize=3,
                        label=f"{label}: {key.replace('_', ' ')}")
        step = plateau_step([(p["step"], p.get("subject_fidelity"), p.get("prompt_fidelity")) for p in pts],
                            eps=eps, window=window)
        if step is not None:
            ax.axvline(step, color=color, linestyle=":", linewidth=1.5, label=f"{label}: plateau at {step:g}")
        drawn += 1
    ax.set_xlabel("step")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    if drawn:  # outside the axes: the curves fill the plot
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small")
    else:
        _empty(ax, "no checkpoint metrics yet (`dbkit checkpoints <run folder> --metrics` measures them)")
    fig.tight_layout()
    return fig


def runs_of(rows: Sequence[dict]) -> list[tuple[str, Path]]:
    """(label, run folder) of an ablation table's trained rows (the base model has no run)."""
    return [(str(r["label"]), Path(r["run_dir"])) for r in rows if r.get("run_dir")]
