"""Facts about the machine a run executes on, and seeding its global random number generators."""

from __future__ import annotations

import platform
import random
from typing import Optional

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (model init; the data has its own seeds)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _cpuinfo_field(*prefixes: str) -> Optional[str]:
    """The value of the first /proc/cpuinfo line starting with one of ``prefixes`` (Linux); None where absent."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(prefixes):
                    return line.split(":", 1)[1]
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (Linux); empty where unknown."""
    flags = _cpuinfo_field("flags", "Features")
    return set() if flags is None else set(flags.split())


def cpu_name() -> str:
    """The processor's model name, for benchmark and export reports."""
    name = _cpuinfo_field("model name")
    return name.strip() if name is not None else platform.processor() or platform.machine()
