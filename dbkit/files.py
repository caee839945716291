"""Atomic file writes and JSON reads: the bottom of the house, imported by anything that
writes (run folders, caches, the toy world's subject folders) and importing nothing of dbkit.

Every file is written atomically (temp file + fsync + rename), so a process killed mid-write
leaves the previous version of a file, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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


def sync_folder(folder: str | Path, files: Mapping[str, bytes]) -> Path:
    """Make `folder` hold `files` (name → bytes, written in their order): files already holding
    these bytes are left alone, any other is rewritten atomically. For folders dbkit generates
    (the toy world's photos), which must match the fingerprint of what wrote them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        if not (path.is_file() and path.read_bytes() == content):
            atomic_write_bytes(path, content)
    return folder


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
    except (FileNotFoundError, NotADirectoryError):  # a path through a regular file cannot exist either
        return default
    return json.loads(text)


def intact_checkpoints(root: Path) -> list[Path]:
    """The ``checkpoint-*`` folders under ``root``, oldest first, whose ``state.pt`` ends in a
    zip central directory (torch.save's format): a file cut short by a full disk or a partial
    copy has none. Cheap (reads the file's tail, not the tensors), so progress messages and
    provenance name the checkpoint a resume will really use (train.readable_checkpoint)."""
    import zipfile

    out = []
    for ckpt in sorted(Path(root).glob("checkpoint-*")):
        try:
            with zipfile.ZipFile(ckpt / "state.pt"):
                out.append(ckpt)
        except (OSError, zipfile.BadZipFile):
            continue
    return out
