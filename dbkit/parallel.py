"""Independent work items (ablation variants) in worker processes, one GPU each where there
are several. The items' results come back in their order."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def device_ids(workers: int, visible: str | None, gpus: int) -> list[str | None]:
    """The GPU each worker is given, as CUDA_VISIBLE_DEVICES names it (the user's own list
    is kept and shared out in turn), or None on a machine without one."""
    if not gpus:
        return [None] * workers
    names = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(k) for k in range(gpus)]
    return [names[k % len(names)] for k in range(workers)]


def _claim_device(devices) -> None:
    device = devices.get()
    if device is not None:  # before anything in this worker starts CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = device


def map_in_workers(fn: Callable[[Any], Any], items: list, workers: int, *, names: list[str] | None = None) -> list:
    """``[fn(x) for x in items]``, ``workers`` at a time, each worker a fresh process. The
    first item that fails raises here; items not started by then are not started, running
    ones finish. A worker that dies (killed, out of memory) is reported with the ``names``
    of the items that were given to the pool."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    import torch

    ctx = mp.get_context("spawn")  # a fork of a process whose torch threads are running can hang
    devices = ctx.Queue()
    for device in device_ids(workers, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count()):
        devices.put(device)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_claim_device,
                                 initargs=(devices,)) as pool:
            return list(pool.map(fn, items))
    except BrokenProcessPool as e:
        listed = ", ".join(names or [repr(x) for x in items])
        raise RuntimeError(f"a worker process died (killed, or out of memory?) while working on: {listed}. "
                           "What finished is kept; run again to do the rest, or with fewer workers") from e
