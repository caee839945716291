"""Plateau marker and per-variant curves (dbkit.curves) on hand-made series and run folders."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

from dbkit import curves

matplotlib.use("Agg")

STEPS = [100, 200, 300, 400, 500, 600]
SUBJECT = [0.10, 0.40, 0.60, 0.61, 0.60, 0.61]
PROMPT = [0.80, 0.80, 0.78, 0.70, 0.60, 0.55]


def test_plateau_is_where_subject_stops_rising_and_prompt_falls() -> None:
    # by hand, eps 0.02, window 2: at 300 the next two subject values (0.61, 0.60) gain at most
    # 0.01 and prompt fidelity goes 0.78 → 0.60; at 200 subject still gains 0.21
    assert curves.plateau_step(list(zip(STEPS, SUBJECT, PROMPT))) == 300
    # shuffled input and points missing a value change nothing
    pts = list(zip(STEPS, SUBJECT, PROMPT))[::-1] + [(350, None, 0.1), (450, 0.9, None)]
    assert curves.plateau_step(pts) == 300
    # a wider window needs the prompt fall to hold further: from 300, 3 ahead ends at 0.55 (< 0.78)
    assert curves.plateau_step(list(zip(STEPS, SUBJECT, PROMPT)), window=3) == 300
    # eps bounds the prompt fall too: 300's fall of 0.18 counts at eps 0.15, not at 0.2 (nor 400's 0.15)
    assert curves.plateau_step(list(zip(STEPS, SUBJECT, PROMPT)), eps=0.15) == 300
    assert curves.plateau_step(list(zip(STEPS, SUBJECT, PROMPT)), eps=0.2) is None


def test_no_plateau_when_prompt_holds_or_subject_keeps_rising() -> None:
    flat_prompt = [0.8] * 6
    assert curves.plateau_step(list(zip(STEPS, SUBJECT, flat_prompt))) is None
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert curves.plateau_step(list(zip(STEPS, rising, PROMPT))) is None
    assert curves.plateau_step(list(zip(STEPS[:2], SUBJECT[:2], PROMPT[:2])), window=2) is None
    with pytest.raises(ValueError, match="window"):
        curves.plateau_step([], window=0)


def _run(tmp_path: Path, name: str, losses: list[float], checkpoints: list[dict] | None, final: dict | None) -> Path:
    rd = tmp_path / name
    rd.mkdir()
    (rd / "train_log.jsonl").write_text("".join(json.dumps({"step": k + 1, "loss": v, "lr": 1e-3}) + "\n"
                                                for k, v in enumerate(losses)), encoding="utf-8")
    (rd / "params.yaml").write_text("train:\n  steps: 600\n", encoding="utf-8")
    if checkpoints is not None:
        (rd / curves.CHECKPOINT_METRICS).write_text("".join(json.dumps(c) + "\n" for c in checkpoints),
                                                    encoding="utf-8")
    if final is not None:
        (rd / "metrics.json").write_text(json.dumps(final), encoding="utf-8")
    return rd


def test_metric_points_add_the_final_metrics_at_the_last_step(tmp_path: Path) -> None:
    ckpts = [{"step": s, "subject_fidelity": a, "prompt_fidelity": b} for s, a, b in zip(STEPS[:5], SUBJECT, PROMPT)]
    rd = _run(tmp_path, "a", [1.0], ckpts[::-1], {"subject_fidelity": 0.61, "prompt_fidelity": 0.55})
    assert [p["step"] for p in curves.metric_points(rd)] == STEPS
    assert curves.metric_points(rd)[-1]["prompt_fidelity"] == 0.55
    alone = _run(tmp_path, "b", [1.0], None, {"subject_fidelity": 0.5})
    assert curves.metric_points(alone) == []  # one final point is no curve


def test_variant_plots_draw_every_run_and_the_plateau_line(tmp_path: Path) -> None:
    ckpts = [{"step": s, "subject_fidelity": a, "prompt_fidelity": b} for s, a, b in zip(STEPS[:5], SUBJECT, PROMPT)]
    a = _run(tmp_path, "a", [1.0, 0.8, 0.6], ckpts, {"subject_fidelity": 0.61, "prompt_fidelity": 0.55})
    b = _run(tmp_path, "b", [0.9, 0.9], None, None)
    runs = curves.runs_of([{"label": "base", "run_dir": None}, {"label": "rank-4", "run_dir": str(a)},
                           {"label": "rank-128", "run_dir": str(b)}])
    assert runs == [("rank-4", a), ("rank-128", b)]

    fig = curves.plot_variant_losses(runs)
    labels = [line.get_label() for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert labels == ["rank-4", "rank-128"]
    smoothed = next(line for line in fig.axes[0].get_lines() if line.get_label() == "rank-4")
    assert list(smoothed.get_xdata()) == [1, 2, 3]

    fig = curves.plot_variant_metrics(runs)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"rank-4: subject fidelity", "rank-4: prompt fidelity", "rank-4: plateau at 300"}
    assert list(lines["rank-4: plateau at 300"].get_xdata()) == [300, 300]
    assert list(lines["rank-4: prompt fidelity"].get_ydata()) == PROMPT
