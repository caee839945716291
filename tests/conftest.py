"""Shared fixtures: a tiny randomly initialised toy-architecture pipeline, and params."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dbkit import cpu_threads

ROOT = Path(__file__).resolve().parent.parent
# torch's own default is remembered first: `threads: 0` hashes as that count (cpu_threads.identity),
# and the notebooks' kernels, fresh processes, see the default, not this process's setting
cpu_threads.default()
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """The toy architecture with random weights (mechanics only; the shipped base is
    what the behaviour tests use)."""
    from dbkit.toyworld import recipe

    path = tmp_path_factory.mktemp("tiny_base") / "base"
    recipe.save_pipeline(recipe.new_components(seed=0), path)
    return path


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in a temp cwd (runs/, data/, .cache/ land there) with the repo's params/ linked."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params").symlink_to(ROOT / "params")
    monkeypatch.setenv("DBKIT_CACHE", str(tmp_path / ".cache"))
    return tmp_path
