"""The run's CPU thread count (params ``threads``), applied where a stage starts.

torch splits a CPU float sum across its threads, so the count can change a result (a
chaotic run lands elsewhere with one thread than with two) while what else runs on the
machine cannot; ``dbkit bench threads`` measures both. ``threads: 0`` keeps torch's own
default (torch picks it, usually one thread per physical core), which this module remembers
before it first changes it, so a process that ran a one-thread variant goes back to the
default for the next run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import hardware

_default: int | None = None


def default() -> int:
    """torch's thread count before dbkit first set one in this process."""
    global _default
    import torch

    if _default is None:
        _default = torch.get_num_threads()
    return _default


def count(p: dict) -> int:
    """The threads a run of params ``p`` computes with."""
    fallback = default()  # remembered before the first change, also when ``p`` sets a count
    return p.get("threads") or fallback


def cores() -> int:
    """The CPU cores this process may run on."""
    return hardware.cores()


def identity(p: dict) -> int | None:
    """The thread count as part of what a run computes: the count the CPU will use (``threads:
    0`` is torch's default *on this machine*, so two machines with other core counts get other
    hashes instead of other figures under one), or None on a CUDA device, where the model's
    arithmetic runs on the GPU whatever the CPU thread count."""
    import torch

    return None if torch.cuda.is_available() else count(p)


def cache_fields(p: dict) -> dict:
    """What a cache key adds for ``p``'s thread count (:func:`identity`), so that no run reuses
    class images, base metrics or merges computed with another count."""
    n = identity(p)
    return {} if n is None else {"threads": n}


def apply(p: dict) -> None:
    """From here on this process computes with ``p``'s thread count."""
    import torch

    n = count(p)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def applied(p: dict) -> Iterator[None]:
    """``p``'s thread count inside the block (an ablation variant's), the previous one after."""
    import torch

    before = torch.get_num_threads()
    apply(p)  # remembers torch's default first, if nothing had yet
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
