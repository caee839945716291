"""What machine computed a figure: CPU model, cores, torch's CPU capability, threads, GPU.

Toy-world training is chaotic in float rounding: the same commit, params and thread count
gave the demo's no-prior variant subject fidelity 0.86 on one CPU and 0.92 on another. Which SIMD kernels torch
picks (``torch.backends.cpu.get_cpu_capability()``: AVX2, AVX512 …) and how many threads
split a sum decide the rounding, so every provenance record and evidence file carries them:
a figure quoted as exact is exact on the hardware named beside it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``'s model name; platform's processor elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux, or /proc unreadable: fall back to what platform knows
        pass
    return platform.processor() or platform.machine() or "unknown"


def cores() -> int:
    """The CPU cores this process may run on (its affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def describe() -> dict:
    """``{cpu_model, cores, cpu_capability, threads, gpu}``: the hardware a figure depends on.
    ``gpu`` is the CUDA device's name, or None on a CPU."""
    info: dict = {"cpu_model": cpu_model(), "cores": cores(), "cpu_capability": None, "threads": None, "gpu": None}
    try:
        import torch
    except ImportError:
        return info
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def summary(info: dict) -> str:
    """One line for a report or a README: ``AMD EPYC (2 cores, AVX2, 2 threads)`` or the GPU."""
    if info.get("gpu"):
        return f"{info['gpu']} (host {info.get('cpu_model', '?')})"
    parts = [f"{info.get('cores', '?')} cores", info.get("cpu_capability") or "?",
             f"{info.get('threads', '?')} threads"]
    return f"{info.get('cpu_model', 'unknown CPU')} ({', '.join(parts)})"
