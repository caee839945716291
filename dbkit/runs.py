"""Run folders, provenance, atomic writes and content-addressed cache paths.

A run lives in ``runs/<experiment>/<hash[:12]>/``: the params hash is in the path, so
re-running the same params finds the same folder and resumes, and changed params can never
overwrite an earlier run. Every file is written atomically (temp file + fsync + rename), so
a run killed mid-write leaves the previous version of a file, never half of one.
A process working in a run folder holds its lock (:func:`lock_run`), so two runs of the same
params never write one folder at once: the second is told who holds it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import importlib.metadata
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from . import hardware
from .config import Experiment
from .files import atomic_write_json, atomic_write_text, intact_checkpoints, read_json
from .hashing import cache_path, stable_hash, writable_cache_dir  # noqa: F401  (runs.cache_path is public)

RUNS_ROOT = Path("runs")
_REPO_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "papermill", "numpy")


class RunDirError(RuntimeError):
    """A run folder holds a different run than the params say."""


# ----------------------------------------------------------------------------- run folders


def run_dir(exp: Experiment, root: Path | None = None) -> Path:
    """``<root>/<name>/<hash[:12]>/``, created with params.yaml and hash.txt, or reused if it exists.

    Raises :class:`RunDirError` when the folder's hash.txt names other params (a 12-hex
    prefix collision, or a folder edited by hand).
    """
    folder = (RUNS_ROOT if root is None else Path(root)) / exp.name / exp.hash[:12]
    hash_file = folder / "hash.txt"
    if hash_file.exists():
        found = hash_file.read_text(encoding="utf-8").strip()
        if found != exp.hash:
            raise RunDirError(f"{folder} holds a run with params hash {found}, not {exp.hash}: "
                              "move that folder away, it is not this experiment's run")
    folder.mkdir(parents=True, exist_ok=True)
    # params.yaml is rewritten on reuse: notes and the name may change without changing the hash
    atomic_write_text(folder / "params.yaml", yaml.safe_dump(exp.params, sort_keys=False, allow_unicode=True))
    if not hash_file.exists():
        # written last: a folder with hash.txt has its params.yaml
        atomic_write_text(hash_file, exp.hash + "\n")
    return folder


def latest_run(name: str, root: Path | None = None) -> Path | None:
    """The run folder of experiment ``name`` written to most recently, or None if it has none."""
    base = (RUNS_ROOT if root is None else Path(root)) / name
    if not base.is_dir():
        return None
    runs = [d for d in base.iterdir() if (d / "hash.txt").is_file()]
    if not runs:
        return None
    # atomic writes rename into the folder, which bumps its mtime: latest = last written to
    return max(runs, key=lambda d: (d.stat().st_mtime_ns, d.name))


# ----------------------------------------------------------------------------- the run lock


LOCK_FILE = "run.lock"
LOCK_ENV = "DBKIT_RUN_LOCK"  # the token of a lock held by the process that started this one
_held: dict[str, int] = {}  # lock file → open descriptor, for the locks this process holds


class RunLocked(RunDirError):
    """Another process is working in the run folder; the message names it and says what to do."""


@contextlib.contextmanager
def lock_run(folder: Path, command: str = "") -> Iterator[dict]:
    """Hold ``<folder>/run.lock`` while working in a run folder: two processes training one
    run would interleave train_log.jsonl and trample each other's checkpoints.

    The lock is an flock on that file, which the OS drops when its process ends, however it
    ends: a lock file a killed run left behind is stale by construction and simply taken
    over. The file records pid, host, start time and command for the message a second
    process gets (:class:`RunLocked`). Nested calls in the holding process pass through, and
    so do the notebook kernels `dbkit run` starts ($DBKIT_RUN_LOCK carries its token).
    On taking the lock, temp files an interrupted run left in the folder are removed.
    Yields the holder record.
    """
    path = Path(folder) / LOCK_FILE
    key = str(path.resolve())
    holder = _read_holder(path)
    if key in _held or (holder.get("token") and holder.get("token") == os.environ.get(LOCK_ENV)):
        yield holder
        return
    fd, holder = _acquire(path, command)
    _held[key] = fd
    try:
        clean_leftovers(Path(folder))
        yield holder
    finally:
        del _held[key]
        _release(fd, path)


def _acquire(path: Path, command: str) -> tuple[int, dict]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + _HOLDER_PATIENCE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_holder(path)
            if _is_live(holder) or time.monotonic() >= deadline:
                raise RunLocked(locked_message(path, holder)) from None
            # the winner holds the lock but has not written its record yet (the file may still
            # hold a killed run's): look again shortly rather than name nobody, or a dead pid
            time.sleep(0.02)
            continue
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file between our open and our lock: lock the new one
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now(),
              "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "token": uuid.uuid4().hex}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))
    return fd, holder


_HOLDER_PATIENCE = 2.0  # seconds a loser waits for the lock holder's record before naming what it has


def _is_live(holder: dict) -> bool:
    """Whether a lock record names a running process (one on another host is taken as running)."""
    if not holder.get("token"):
        return False
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:  # kill(0 or -1, …) would address whole process groups
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's process: running
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _release(fd: int, path: Path) -> None:
    # removed while still locked: whoever opened it meanwhile sees a stale inode and retries
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def locked_message(path: Path, holder: dict) -> str:
    """What a second process is told: who holds the run folder, since when, and what to do."""
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
    if holder.get("command"):
        who += f" (`{holder['command']}`)"
    return (f"{path}: this run folder is in use by {who}: wait until that run ends; if that process is gone, "
            f"delete {path} and run again")


def clean_leftovers(folder: Path) -> list[Path]:
    """Remove what an interrupted run left half-written in its folder (atomic-write temp files,
    a checkpoint being saved); only called with the run lock held, so nobody is writing them."""
    gone = [p for p in folder.rglob(".*.tmp") if p.is_file()]
    gone += [p for p in (folder / "checkpoints").glob(".tmp-*") if p.is_dir()]
    gone += [p for p in folder.glob(".*.tmp") if p.is_dir()]  # a folder being copied in (dbkit.reuse)
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if gone:
        print(f"note: removed {len(gone)} temp file(s) an interrupted run left in {folder}", file=sys.stderr)
    return gone


def describe_os_error(e: OSError, where: str = "") -> str:
    """One line for a failed file operation: the file, the reason and what to do."""
    head = f"{e.filename or where}: {e.strerror or e}" if (e.filename or where) else str(e.strerror or e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{head}: the disk is full: free some space (checkpoints under runs/ and .cache/dbkit are the "
                "largest) and run the same command again; training resumes from its latest checkpoint")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{head}: not writable here: make it writable, or write elsewhere (--reports <folder> for reports)"
    if e.errno == errno.ENAMETOOLONG:
        return f"{head}: a name is too long for this file system: shorten the experiment name"
    return f"{head}: check that path and the disk, then run the same command again"


# ----------------------------------------------------------------------------- training progress


def read_log(path: Path) -> list[dict]:
    """The records of a JSONL log such as train_log.jsonl. A line that does not parse (the last
    one, torn by a kill or a full disk mid-write) is skipped with a warning naming the file."""
    if not Path(path).is_file():
        return []
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        else:
            print(f"warning: {path}: line {n} is incomplete or not a JSON record (a run stopped while writing "
                  "it?); skipped", file=sys.stderr)
    return out


def training_progress(folder: Path) -> tuple[int, int]:
    """(last step in train_log.jsonl, step of the latest checkpoint): where an interrupted run
    stopped and where `dbkit run` resumes it (0 = from the start)."""
    with contextlib.redirect_stderr(io.StringIO()):  # the caller states the outcome itself
        steps = [r["step"] for r in read_log(Path(folder) / "train_log.jsonl") if isinstance(r.get("step"), int)]
    ckpts = intact_checkpoints(Path(folder) / "checkpoints")  # the one a resume will really use
    ckpt = int(ckpts[-1].name.rpartition("-")[2]) if ckpts and ckpts[-1].name.rpartition("-")[2].isdigit() else 0
    return (steps[-1] if steps else 0), ckpt


# ----------------------------------------------------------------------------- provenance


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device() -> str:
    try:
        import torch
    except ImportError:
        return f"cpu ({os.cpu_count()} cores, no torch)"
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


def _dirty_files(status: str | None) -> list[str]:
    """The paths `git status --porcelain` lists (at most 20): what made a record dirty."""
    if not status:
        return []
    return [line[3:] for line in status.splitlines() if line.strip()][:20]


def code_state() -> dict:
    """``{git_commit, git_dirty, dirty_files}`` of the checkout: what code produced a figure.
    reports/ is left out: every run rewrites the tracked reports/index.html, so counting it
    would mark every run dirty and the flag would say nothing about the code."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", ".", ":(exclude)reports")
    return {"git_commit": commit.strip() if commit else None,
            "git_dirty": bool(status.strip()) if status is not None else None,
            "dirty_files": _dirty_files(status)}


def package_versions() -> dict[str, str | None]:
    """The installed versions of the packages a figure depends on."""
    return {p: _version(p) for p in _PACKAGES}


def provenance(exp: Experiment) -> dict:
    """Everything needed to say what produced a stage of a run: code version, environment,
    params hash, data fingerprint, seed, time."""
    from .data import data_fingerprint

    return {
        **code_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": _device(),
        "hardware": hardware.describe(),
        "params_hash": exp.hash,
        "data_fingerprint": data_fingerprint(exp.params),
        "seed": exp.params["seed"],
        "experiment": exp.name,
        "params_file": str(exp.path),
        "timestamp": utc_now(),
    }


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# The notebooks' stages, in order; each records its own provenance when it runs.
STAGES = ("data", "captions", "train", "metrics", "ablations", "report")


def write_provenance(run_dir: Path, exp: Experiment, stage: str, **extra: Any) -> dict:
    """Record ``stage``'s provenance (plus ``extra``) in the run's ``provenance.json``,
    keeping the other stages' records: re-running one notebook must not restamp the
    others (a report made today says nothing about the code that trained last week).
    Returns the stage's record."""
    path = Path(run_dir) / "provenance.json"
    info = read_provenance(run_dir)
    record = provenance(exp) | extra
    info["stages"][stage] = record
    atomic_write_json(path, info)
    return record


def update_provenance(run_dir: Path, stage: str, **fields: Any) -> None:
    """Add fields to ``stage``'s record (e.g. when training finished); no-op without one."""
    info = read_provenance(run_dir)
    if stage in info["stages"]:
        info["stages"][stage].update(fields)
        atomic_write_json(Path(run_dir) / "provenance.json", info)


def put_provenance(run_dir: Path, stage: str, record: dict) -> None:
    """Set ``stage``'s record as given (one copied from another run), keeping the other stages."""
    info = read_provenance(run_dir)
    info["stages"][stage] = record
    atomic_write_json(Path(run_dir) / "provenance.json", info)


def read_params(run_dir: Path) -> dict | None:
    """The params a run folder was made with (its params.yaml), None when there is none."""
    path = Path(run_dir) / "params.yaml"
    if not path.is_file():
        return None
    found = yaml.safe_load(path.read_text(encoding="utf-8"))
    return found if isinstance(found, dict) else None


def read_provenance(run_dir: Path) -> dict:
    """``{"stages": {stage: record}}`` from the run's provenance.json (empty when missing).
    A file from an older dbkit holds one record, restamped by every notebook: its stage is
    unknown, so it is kept as "unknown"."""
    info = read_json(Path(run_dir) / "provenance.json", default={})
    if "stages" not in info:
        info = {"stages": {"unknown": info} if info else {}}
    return info


def record_timing(run_dir: Path, stage: str, seconds: float) -> None:
    """Set ``stage``'s wall time in the run's ``timings.json``, keeping the other stages."""
    path = Path(run_dir) / "timings.json"
    timings = read_json(path, default={})
    timings[stage] = round(float(seconds), 3)
    atomic_write_json(path, timings)


# ----------------------------------------------------------------------------- caches


