"""Per-iteration learning-rate schedules on top of torch's LambdaLR."""

from __future__ import annotations

import math

import torch

from ..config import SchedConfig
from ..errors import ConfigError


class WarmupCosine:
    """Linear warm-up from ``start_factor`` to 1, then cosine from 1 to ``floor`` at ``total`` steps."""

    def __init__(self, warmup_steps: int, total_steps: int, start_factor: float = 0.0, floor: float = 0.0):
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)
        self.start_factor, self.floor = start_factor, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig, steps_per_epoch: int, epochs: int, base_lr: float):
    """A LambdaLR stepped once per iteration."""
    if cfg.name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if cfg.name == "warmup_cosine":
        total = steps_per_epoch * epochs
        warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total)
        floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total, cfg.warmup_start_factor, floor))
    raise ConfigError(f"unknown schedule {cfg.name!r}; choose warmup_cosine or constant")
