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


def map_in_workers(fn: Callable[[Any], Any], items: list, workers: int) -> list:
    """``[fn(x) for x in items]``, ``workers`` at a time, each worker a fresh process. An
    item that fails raises here once the others have finished."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import torch

    ctx = mp.get_context("spawn")  # a fork of a process whose torch threads are running can hang
    devices = ctx.Queue()
    for device in device_ids(workers, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count()):
        devices.put(device)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_claim_device,
                             initargs=(devices,)) as pool:
        return list(pool.map(fn, items))
