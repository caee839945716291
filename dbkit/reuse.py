"""Reusing a finished training of the same params from another experiment's run folder.

The params hash leaves out the experiment's name (config.HASH_EXCLUDE), so experiments that
share their parent's main-run params (the research notes), and ablation variants equal to
another experiment's, would each train the identical model under their own name. Before
training ``runs/<name>/<hash12>/``, :func:`reuse_training` looks for ``runs/*/<hash12>/`` whose
hash.txt and train_done.json both say this exact hash and which has ``output/``; holding that
folder's lock (so no trainer is writing it), it copies what training leaves there (hard links
where the file system allows) and records in the "train" provenance where the model came from,
keeping the source's own record (the code and machine that trained it).
`train.reuse_identical: false` turns this off.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from . import runs
from .files import atomic_write_json, read_json

# What training leaves in a run folder (train.train, workflow.preview_writer), and the
# evaluations of that model: metrics.* and sample.* are in the params hash, so they are current.
# timings.json and provenance.json are per-run records, written separately.
TRAINED = ("output", "checkpoints", "samples", "logs", "train_log.jsonl", "steps_curve.jsonl",
           "metrics.json", "checkpoint_metrics.jsonl")
DONE = "train_done.json"


def finished(folder: Path, params_hash: str) -> bool:
    """Whether ``folder`` holds a finished training of exactly ``params_hash``."""
    try:
        recorded = (folder / "hash.txt").read_text(encoding="utf-8").strip()
        done = read_json(folder / DONE)
    except (OSError, ValueError):
        return False
    return recorded == params_hash and isinstance(done, dict) and done.get("hash") == params_hash \
        and (folder / "output").is_dir()


def candidates(rd: Path, params_hash: str) -> list[Path]:
    """Other finished run folders of ``params_hash`` under ``rd``'s runs root, by name. A run
    folder outside the ``<root>/<experiment>/<hash12>`` layout (a notebook's own run_dir) has none."""
    if rd.name != params_hash[:12]:
        return []
    here = rd.resolve()
    return [d for d in sorted(rd.parent.parent.glob(f"*/{params_hash[:12]}"))
            if d.resolve() != here and finished(d, params_hash)]


def reuse_training(rd: Path, params_hash: str) -> Path | None:
    """Copy a finished identical training into ``rd`` (whose lock the caller holds); returns
    the folder it came from, or None when there is none free to copy (then train)."""
    for src in candidates(rd, params_hash):
        try:
            with runs.lock_run(src, command=f"dbkit: copying its training into {rd}"):
                if finished(src, params_hash):  # again, now that no trainer can be in it
                    copy_training(src, rd)
                    return src
        except runs.RunLocked:
            continue  # a trainer is working there: not finished as far as we can tell
    return None


def copy_training(src: Path, rd: Path) -> None:
    """Training's files from ``src`` into ``rd``, each swapped in whole; train_done.json last,
    so an interrupted copy reads as an unfinished run and is copied (or trained) again."""
    t0 = time.time()
    for name in TRAINED:
        if (src / name).exists():
            _copy_atomic(src / name, rd / name)
        else:  # a half-trained leftover here that the finished run does not have
            _remove(rd / name)
    record_reuse(src, rd)
    runs.record_timing(rd, "train (reused)", time.time() - t0)
    done = read_json(src / DONE) | {"reused_from": str(src)}
    atomic_write_json(rd / DONE, done)


def record_reuse(src: Path, rd: Path) -> None:
    """The "train" provenance: the source's record (its code, machine and finished time: the
    model's provenance) plus where it was copied from and when, and where it was trained."""
    trained = runs.read_provenance(src)["stages"].get("train") or {}
    runs.put_provenance(rd, "train", trained | {
        "reused_from": str(src), "trained_in": trained.get("trained_in") or str(src), "reused_at": runs.utc_now()})


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")  # runs.clean_leftovers removes it after a kill
    _remove(tmp)
    if src.is_dir():
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, tmp)
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)  # a folder cannot be replaced by a rename; a file can
    os.replace(tmp, dst)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    # dbkit replaces files (atomic writes) but appends to its .jsonl logs in place (a resumed
    # run's train_log): those are copied, so one run's log never grows in another's folder
    if str(src).endswith(".jsonl"):
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
