"""Run folders, provenance, atomic writes and content-addressed cache paths.

A run lives in ``runs/<experiment>/<hash[:12]>/``: the params hash is in the path, so
re-running the same params finds the same folder and resumes, and changed params can never
overwrite an earlier run. Every file is written atomically (temp file + fsync + rename), so
a run killed mid-write leaves the previous version of a file, never half of one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .config import Experiment, stable_hash

RUNS_ROOT = Path("runs")
_REPO_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "papermill", "numpy")


class RunDirError(RuntimeError):
    """A run folder holds a different run than the params say."""


# ----------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600 files; keep an existing file's mode, else the usual 0644
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # makes the rename itself durable; not possible on every platform, hence best effort
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Indented JSON (Paths written as strings), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return obj.as_posix()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path, default: Any = None) -> Any:
    """Parsed JSON of ``path``, or ``default`` when the file does not exist."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return default
    return json.loads(text)


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


def provenance(exp: Experiment) -> dict:
    """Everything needed to say what produced a stage of a run: code version, environment,
    params hash, data fingerprint, seed, time."""
    from .data import data_fingerprint

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    return {
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(status.strip()) if status is not None else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in _PACKAGES},
        "device": _device(),
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


def cache_path(kind: str, key: dict, root: Path | None = None) -> Path:
    """``<root>/<kind>/<sha256(key)[:16]>``: the same inputs always give the same path (not created).

    ``root`` defaults to ``$DBKIT_CACHE`` or ``.cache/dbkit``; ``key`` must hold everything the
    cached thing depends on (model hash, prompt, seed, …).
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", kind):
        raise ValueError(f"cache kind {kind!r} must be a simple folder name")
    base = Path(os.environ.get("DBKIT_CACHE", ".cache/dbkit")) if root is None else Path(root)
    return base / kind / stable_hash(key)[:16]
