"""`dbkit bench threads`: what running trainings side by side on a CPU costs, and whether
it changes their results.

The training is `dbkit bench trainer`'s (dbkit's side: the shipped base, eyed_heart, 64 px,
batch 4, LoRA rank 8 on the attention projections), started as separate processes: alone
with every core's thread, alone with one thread, and two at once under several OpenMP
settings. For each setting it reports every process's steady steps/s, the set's throughput
against the lone run, and whether each process's loss log equals the lone run's to the last
digit. The thread count decides how a float sum is split, so it can change a result; what
runs beside a process cannot.

Why this is a bench and not a test: it is a property of the machine (cores, other load,
the OpenMP runtime torch was built with), measured in minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .bench_trainer import dbkit_command, dbkit_env, log_points, steady_rate


@dataclass(frozen=True)
class Setting:
    """Processes started together, each with `threads` OpenMP threads and `env` added."""

    label: str
    processes: int
    threads: int
    env: dict[str, str] = field(default_factory=dict)


def settings(cores: int) -> list[Setting]:
    """The lone all-cores run first: every other setting is compared with it."""
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}
    return [
        Setting(f"alone, {cores} threads", 1, cores),
        Setting("alone, 1 thread", 1, 1),
        Setting(f"alone, {cores} threads, OMP_WAIT_POLICY=PASSIVE", 1, cores, passive),
        Setting(f"two at once, {cores} threads each", 2, cores),
        Setting(f"two at once, {cores} threads each, OMP_WAIT_POLICY=PASSIVE", 2, cores, passive),
        Setting("two at once, 1 thread each", 2, 1),
    ]


def losses(log: Path) -> list[float]:
    from .runs import read_log

    return [rec["loss"] for rec in read_log(log)]


def summarise(setting: Setting, rates: list[float], logs: list[list[float]], ref_rate: float,
              ref_losses: list[float], wall: float) -> dict:
    """One setting's row: the throughput is the sum of its processes' steps/s over the lone
    run's; `identical` says, per process, whether every step's loss equals the lone run's."""
    return {"setting": setting.label, "processes": setting.processes, "threads_each": setting.threads,
            "steps_per_s": [round(r, 2) for r in rates], "throughput_x": round(sum(rates) / ref_rate, 2),
            "identical_to_alone": [log == ref_losses for log in logs], "wall_s": round(wall, 1)}


def run_setting(setting: Setting, work: Path, photos: Path, *, steps: int, noun: str) -> tuple[list[Path], float]:
    """Start the setting's processes together, each in its own project root; their logs."""
    procs, roots = [], []
    t0 = time.time()
    for k in range(setting.processes):
        root = work / f"p{k}"
        root.mkdir(parents=True)
        env = dbkit_env(root) | setting.env | {"OMP_NUM_THREADS": str(setting.threads)}
        out = open(work / f"p{k}.log", "w")  # closed once its process has exited, below
        procs.append((subprocess.Popen(dbkit_command(photos, steps, 4, 8, 64, noun), env=env, stdout=out,
                                       stderr=subprocess.STDOUT), out))
        roots.append(root)
    failed = []
    for k, (proc, out) in enumerate(procs):
        if proc.wait():
            failed.append(str(work / f"p{k}.log"))
        out.close()
    if failed:
        raise RuntimeError(f"dbkit train failed in '{setting.label}': see {', '.join(failed)}")
    return [next((r / "runs").rglob("train_log.jsonl")) for r in roots], time.time() - t0


def bench_threads(*, subject: str = "eyed_heart", steps: int = 300, skip: int = 20,
                  cores: int | None = None) -> dict:
    """Every setting in turn (nothing else should run meanwhile); see the module's docstring."""
    from . import data
    from .toyworld import subjects

    cores = cores or len(os.sched_getaffinity(0))
    noun = subjects.get(subject).class_noun
    photos = data.resolve_folder(f"toyworld:{subject}")
    rows: list[dict] = []
    ref_rate = ref_losses = None
    for setting in settings(cores):
        work = Path(tempfile.mkdtemp(prefix="dbkit-bench-threads-"))
        try:
            logs, wall = run_setting(setting, work, photos, steps=steps, noun=noun)
            rates = [steady_rate(log_points(log), skip) for log in logs]
            runs = [losses(log) for log in logs]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if ref_rate is None:
            ref_rate, ref_losses = rates[0], runs[0]
        rows.append(summarise(setting, rates, runs, ref_rate, ref_losses, wall))
    return {"steps": steps, "steady_from_step": skip, "cores": cores, "settings": rows}
