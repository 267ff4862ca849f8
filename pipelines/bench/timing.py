"""Timing side by side: synchronized single calls, interleaved rounds of several variants, medians, ratios."""

from __future__ import annotations

import ctypes
import gc
import logging
import statistics
import sys
import time
from typing import Callable, Optional

import torch

log = logging.getLogger("pipelines.benchmark")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_one(fn: Callable[[], object], device: torch.device, before: Optional[Callable[[], object]] = None) -> float:
    """Milliseconds of one call of ``fn``; ``before`` runs first, outside the timed region.

    On CUDA the device is synchronized before the call and the call is timed with CUDA events, so
    the figure is the wall time of the call including any launch overhead. On the CPU the call is
    timed with ``time.perf_counter`` (CPU kernels run synchronously).
    """
    if before is not None:
        before()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_rounds(calls: dict, device: torch.device, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time several variants in interleaved rounds: each round runs one call of every variant.

    ``calls`` maps a key to ``(fn, before)``. Interleaving makes a change in machine load (other
    processes on a shared machine, clock changes) hit every variant alike instead of whichever
    happened to run at the time. Returns the milliseconds of the ``repeats`` timed calls per key.
    """
    for _ in range(warmup):
        for fn, before in calls.values():
            if before is not None:
                before()
            fn()
    sync(device)
    out: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, (fn, before) in calls.items():
            out[key].append(time_one(fn, device, before))
    return out


def timing_note(device: torch.device, what: str) -> str:
    """How the ``what`` (models, variants) of a section interleaved in rounds were timed."""
    how = "CUDA events, synchronized before each step" if device.type == "cuda" else "time.perf_counter per step"
    return f"{how}; {what} interleaved round by round"


def ratio(rows: dict, a: str, b: str, field: str = "ms") -> Optional[float]:
    """``rows[a][field] / rows[b][field]``, None where either row or value is missing or zero."""
    va, vb = rows.get(a, {}).get(field), rows.get(b, {}).get(field)
    return va / vb if va and vb else None


def summarize_ms(samples: list[float]) -> dict:
    """Median (the reported figure), min, max and all samples of a list of milliseconds."""
    return {
        "ms": statistics.median(samples),
        "ms_min": min(samples),
        "ms_max": max(samples),
        "ms_all": [round(s, 4) for s in samples],
    }


class Stopwatch:
    """Wall time of a block that ends with a device synchronization."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = float("nan")

    def __enter__(self):
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so that RSS baselines are not inflated."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
