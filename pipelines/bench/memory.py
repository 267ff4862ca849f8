"""Peak memory of a benchmarked call: the device allocator's peak, or the process's peak RSS on a CPU."""

from __future__ import annotations

import logging
import re
from typing import Optional

import torch

from .timing import free_memory, sync

log = logging.getLogger("pipelines.benchmark")


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of what is built and run between ``start()`` and ``stop()``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset, less the memory allocated at
    ``start()`` (tensors only: weights, gradients, optimizer state and activations; not the caching
    allocator's reserve or the CUDA context).
    CPU (Linux): the rise of the process's peak resident set (VmHWM, reset through
    ``/proc/self/clear_refs``) over its resident set at ``start()``. It counts everything the
    process touched (allocator slack, oneDNN scratch buffers, library code paged in), so it is an
    indicative figure, not a tensor count. Elsewhere: not measured (None).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base_kib: Optional[int] = None
        self.ok = False

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated rise"
        return "peak RSS rise (VmHWM - VmRSS at start)" if self.ok else "n/a"

    def start(self) -> None:
        free_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
            self.ok = True
            return
        self.ok = _reset_rss_peak()
        self.base_kib = _proc_status_kib("VmRSS") if self.ok else None
        self.ok = self.ok and self.base_kib is not None

    def stop(self) -> Optional[float]:
        """The peak in MiB, or None where it cannot be measured."""
        if self.device.type == "cuda":
            sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base_bytes) / 2**20
        if not self.ok:
            return None
        hwm = _proc_status_kib("VmHWM")
        return None if hwm is None else max(hwm - self.base_kib, 0) / 1024.0
