"""Facts about the machine a benchmark ran on (CPU, threads, load), recorded beside every figure."""

from __future__ import annotations

import logging
import os
import platform
import time
from typing import Optional

import torch

from repopt.host import cpu_name

log = logging.getLogger("pipelines.benchmark")


def load_average() -> Optional[list[float]]:
    """The 1, 5 and 15 min load averages (rounded), None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict:
    import torchvision

    cpu = cpu_name()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu})",
        "load_average_start": load_average(),
        "other_cpu_busy_start": cpu_busy_fraction(),
    }


def cpu_busy_fraction(interval: float = 0.5) -> Optional[float]:
    """Share of all cores busy during ``interval`` s while this process sleeps (i.e. other processes' load).

    Read from /proc/stat (Linux); None elsewhere. A CPU timing taken while other processes keep the
    cores busy measures the scheduler more than the code: with 2 threads on 2 shared cores every
    parallel region waits for its second thread to be scheduled.
    """

    def snapshot():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return idle, sum(fields[:8])

    try:
        idle0, total0 = snapshot()
        time.sleep(interval)
        idle1, total1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return round(1.0 - (idle1 - idle0) / total, 3) if total > 0 else None
