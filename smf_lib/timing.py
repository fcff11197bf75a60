"""Measuring time and memory fairly: GPU work waited for, functions timed in rotation, medians, peak memory."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of `fn`, GPU work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                warmup: int = 1) -> dict[str, list[float]]:
    """Time every function `repeats` times in rotation (a, b, a, b, ...) after `warmup` untimed rounds, so that a
    machine that slows down or speeds up affects all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            seconds = time_call(fn, device)
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def median(values: Sequence[float]) -> float:
    """The median of a non-empty list."""
    return float(statistics.median(values))


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory so far in MB: the CUDA allocator's peak on a GPU, else this process's peak resident set size."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():  # Linux: ru_maxrss would include the parent's RSS at fork time; VmHWM is this program's own
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**10
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB elsewhere


def reset_peak_memory(device: torch.device | None = None) -> bool:
    """Start a new peak for `peak_memory_mb`; return whether this platform can (CUDA, or Linux's clear_refs)."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: writing 5 to clear_refs resets the resident-set high-water mark (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
