"""Content hashes: canonical JSON, its sha256, and the cache folder a hash names.

The bottom of the house (nothing of dbkit imported): params hashing (config), run folders
(runs) and every cache (class images, captions, merges …) use the same three functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data always gives equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return obj.as_posix()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot hash a {type(obj).__name__}: {obj!r}")


def stable_hash(obj: Any) -> str:
    """sha256 hex digest of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def cache_path(kind: str, key: dict, root: Path | None = None) -> Path:
    """``<root>/<kind>/<sha256(key)[:16]>``: the same inputs always give the same path (not created).

    ``root`` defaults to ``$DBKIT_CACHE`` or ``.cache/dbkit``; ``key`` must hold everything the
    cached thing depends on (model hash, prompt, seed, …).
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", kind):
        raise ValueError(f"cache kind {kind!r} must be a simple folder name")
    base = cache_root() if root is None else Path(root)
    return base / kind / stable_hash(key)[:16]


def cache_root() -> Path:
    """``$DBKIT_CACHE``, else ``.cache/dbkit`` (relative to the project root dbkit works in)."""
    return Path(os.environ.get("DBKIT_CACHE", ".cache/dbkit"))


class CacheNotWritable(RuntimeError):
    """The cache folder cannot be written; the message names it and how to move it."""


def writable_cache_dir(folder: Path) -> Path:
    """Create ``folder`` (a :func:`cache_path`) and check a file can be written in it, before a
    cache entry is computed: a bare PermissionError would name a hashed sub-folder the user
    never chose, and only after the work that was to be cached."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}.tmp"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise CacheNotWritable(
            f"{cache_root()}: the cache folder is not writable ({e.strerror or e}: {e.filename or folder}): make "
            "it writable, or set DBKIT_CACHE=<a writable folder> to move the cache") from e
    return folder
