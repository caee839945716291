"""A run's kept checkpoints side by side: a grid (rows = checkpoint steps, columns = seeds, one
fixed prompt) and, optionally, each checkpoint's metrics (``checkpoint_metrics.jsonl``).

Each checkpoint is loaded as the playground loads it (:class:`dbkit.playground.Playground`):
written out as an output folder by ``train.export_checkpoint`` and read back with diffusers'
public loaders, so a row shows what a user of that checkpoint's files would get. The final
output is the last row. Metrics use the same evaluation as ``metrics.json``; they are cached in
the run folder by step (the folder's params hash covers the sampling and metrics settings).
:func:`evaluate_output` measures the final output on other evaluation seeds (a hold-out check).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from PIL import Image

from . import config, cpu_threads, playground, report, workflow
from .curves import CHECKPOINT_METRICS
from .files import atomic_write_text


def experiment_of(rd: Path) -> config.Experiment:
    """The experiment a run folder was trained with (its ``params.yaml``, validated again);
    this process computes with its thread count from here on."""
    exp = config.load(Path(rd) / "params.yaml", [], check_prose=False)  # the prose of its day
    cpu_threads.apply(exp.params)
    return exp


def ordered_sources(rd: Path) -> list[tuple[str, str]]:
    """(row label, playground source) of every kept checkpoint by step, then the final output."""
    found = playground.sources(rd)
    steps = sorted((int(name.split()[1]), name) for name in found if name != playground.FINAL)
    rows = [(f"step {s}", name) for s, name in steps]
    if playground.FINAL in found:
        rows.append(("final", playground.FINAL))
    return rows


def checkpoint_rows(exp: config.Experiment, rd: Path, prompt: str, seeds: list[int]) -> list[tuple[str, list]]:
    """(label, one image per seed) for every kept checkpoint and the final output, drawn with the
    experiment's sample.* settings; ``{subject}`` in the prompt expands as in params."""
    pg = playground.Playground(exp, rd)
    rows = [(label, pg.draw(prompt, source=source, seeds=seeds)[0]) for label, source in ordered_sources(rd)]
    if not rows:
        raise ValueError(f"{rd}: no checkpoint or final output to sample: train it first (train.save_every sets "
                         "how often checkpoints are kept)")
    return rows


def checkpoint_grid(exp: config.Experiment, rd: Path, prompt: str, seeds: list[int], *,
                    scale: int = 2) -> Image.Image:
    """The grid of :func:`checkpoint_rows`: rows = steps (then final), columns = seeds."""
    rows = checkpoint_rows(exp, rd, prompt, seeds)
    return report.image_grid(rows, [f"seed {s}" for s in seeds], title=prompt, scale=scale)


def evaluate_checkpoints(exp: config.Experiment, rd: Path) -> list[dict]:
    """Each kept checkpoint's metrics (the evaluation of metrics.json), one line per step in
    ``checkpoint_metrics.jsonl``; steps already there are not measured again. Returns all lines."""
    path = Path(rd) / CHECKPOINT_METRICS
    done = {r["step"]: r for r in report.read_jsonl(path) if isinstance(r.get("step"), int)}
    pg = playground.Playground(exp, rd)
    for _, source in ordered_sources(rd):
        if source == playground.FINAL:
            continue  # metrics.json is the final step's point
        step = int(source.split()[1])
        if step in done:
            continue
        pipe = pg.pipeline(source, exp.params["sample"]["lora_scale"])
        measured = workflow.evaluate_model(exp.params, pipe)
        if measured is None:
            raise ValueError(f"{rd}: no metrics for this subject: user photos need metrics.backend: clip")
        done[step] = {"step": step, **measured}
        # rewritten whole after each checkpoint: an interrupted evaluation keeps what it measured
        atomic_write_text(path, "".join(json.dumps(done[s]) + "\n" for s in sorted(done)))
    return [done[s] for s in sorted(done)]


def evaluate_output(exp: config.Experiment, rd: Path, seeds: list[int]) -> list[dict]:
    """The final output's metrics, measured as metrics.json is but on the evaluation images of
    ``metrics.seed`` = each of ``seeds``: a hold-out check of a choice made by looking at
    metrics.json (a step count, merge weights), without training again, which
    ``-p metrics.seed=…`` would do since that key is in the params hash. Refused (ValueError)
    where the run has no final output or nothing measures it."""
    if playground.FINAL not in playground.sources(rd):  # the loader would quietly give the base
        raise ValueError(f"{rd}: no final output (training has not finished): finish it with "
                         "`dbkit run`, or measure its checkpoints with `dbkit checkpoints --metrics`")
    if not workflow.has_oracle_metrics(exp.params):
        raise ValueError(f"{rd}: nothing measures this run's photos with metrics.backend "
                         f"{exp.params['metrics']['backend']!r}: set metrics.backend: clip in its params")
    pipe = workflow.trained_pipeline(exp, rd)
    out = []
    for seed in seeds:
        p = copy.deepcopy(exp.params)
        p["metrics"]["seed"] = seed
        out.append({"seed": seed, **workflow.evaluate_model(p, pipe)})
    return out
