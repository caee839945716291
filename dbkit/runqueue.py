"""Run many experiments in order (`dbkit run params/notes/*.yaml`): skip the ones already
published with the same params hash, go on past a failed one, and summarise.

"Finished" means what a reader can see: ``reports/<experiment>/<version12>/version.json`` says
status ok and lists all five notebooks. The version hash covers the run hash and the ablation,
merge and report sections (config.version_hash), so an edited experiment runs again into a new
version; its trainings are still reused by their own run hashes. A run folder with a trained model but no published
report is not finished (its report is rendered, reusing the trained model).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import config, runner
from .files import read_json


@dataclass
class Outcome:
    params: str
    experiment: str
    status: str  # ran | skipped | failed
    seconds: float
    report: str  # the version folder, or where the failure is described
    message: str = ""


def published(params_path: str | Path, overrides: list[str], reports_root: Path) -> Path | None:
    """The report version of these params when it was published complete, else None."""
    exp = config.load(params_path, overrides)
    version = runner.ReportSet(Path(reports_root), exp.name, exp.version).version
    info = read_json(version / runner.VERSION_FILE) or {}
    complete = info.get("status") == "ok" and set(info.get("notebooks", [])) >= set(runner.NOTEBOOKS)
    return version if complete else None


def run_queue(params_files: list[str], overrides: list[str], *, reports_root: Path = Path("reports"),
              run_one: Callable[..., Path] | None = None, **kw) -> list[Outcome]:
    """Each params file in order; a failure is recorded and the next one runs. Ctrl-C stops
    the queue (the interrupted run says how to resume)."""
    run_one = run_one or runner.run_experiment
    outcomes = []
    for params in params_files:
        t0 = time.perf_counter()
        try:
            done = published(params, overrides, reports_root)
            if done is not None:
                outcomes.append(Outcome(params, done.parent.name, "skipped", 0.0, str(done), "already published"))
                continue
            out = run_one(params, overrides, reports_root=reports_root, **kw)
            outcomes.append(Outcome(params, Path(out).parent.name, "ran", time.perf_counter() - t0, str(out)))
        except (KeyboardInterrupt, runner.RunStopped):
            raise
        except Exception as e:  # noqa: BLE001 - one experiment's failure must not stop the others
            outcomes.append(Outcome(params, _name_of(params), "failed", time.perf_counter() - t0,
                                    "", " ".join(str(e).split())[:300] or type(e).__name__))
    return outcomes


def _name_of(params: str) -> str:
    try:
        return config.load(params, []).name
    except Exception:  # noqa: BLE001 - the params themselves may be what failed
        return Path(params).stem


def summary(outcomes: list[Outcome]) -> str:
    """A plain-text table: experiment, status, wall time, report (or the failure)."""
    rows = [("params", "experiment", "status", "wall", "report / error")]
    rows += [(o.params, o.experiment, o.status, f"{o.seconds / 60:.1f} min" if o.status == "ran" else "-",
              o.report or o.message) for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ran", "skipped", "failed")}
    return "\n".join(lines + [", ".join(f"{n} {s}" for s, n in counts.items())])
