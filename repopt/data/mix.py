"""Mixup and CutMix of a training batch on its device, drawn from (seed, epoch, batch index).

torchvision's ``v2.MixUp`` and ``v2.CutMix`` do the mixing: both pair every sample with the one
before it in the batch (``x.roll(1, 0)``) and turn the int labels into soft ones,
``lam * one_hot(y) + (1 - lam) * one_hot(y.roll(1, 0))``. With both on, ``v2.RandomChoice``
picks CutMix with ``switch_prob``; ``v2.RandomApply`` mixes a batch with probability ``prob``.
Those transforms draw from torch's global CPU generator, so each batch runs them inside
``torch.random.fork_rng`` with that generator seeded from (run seed, epoch, batch index): the
draws of batch k are the same whether the epoch started at 0 or was resumed at k, and the
run's own generator state is left as it was. Under DDP every rank draws the same lam and box and
mixes the pairs inside its own slice of the global batch.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from ..config import MixConfig
from .seeding import MIX_STREAM, mix_seed


class BatchMix:
    """``mix(x, y, epoch, batch) -> (mixed x, soft labels (N, num_classes) float32)``."""

    def __init__(self, cfg: MixConfig, num_classes: int, seed: int):
        if not cfg.enabled:
            raise ValueError("BatchMix needs mix.mixup_alpha > 0 or mix.cutmix_alpha > 0")
        ops = []
        if cfg.mixup_alpha > 0:
            ops.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
        if cfg.cutmix_alpha > 0:
            ops.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
        if len(ops) == 2:
            chosen = v2.RandomChoice(ops, p=[1.0 - cfg.switch_prob, cfg.switch_prob])
        else:
            chosen = ops[0]
        self.transform = chosen if cfg.prob >= 1 else v2.RandomApply([chosen], p=cfg.prob)
        self.num_classes, self.seed = num_classes, int(seed)

    @classmethod
    def build(cls, cfg: MixConfig, num_classes: int, seed: int) -> BatchMix | None:
        """The mixer of a run, or None when mixing is off."""
        return cls(cfg, num_classes, seed) if cfg.enabled else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):  # only the CPU generator: the transforms draw nothing elsewhere
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, MIX_STREAM, batch))
            mixed, soft = self.transform(x, y)
        if soft.dim() == 1:  # RandomApply left this batch alone: the same soft format as a mixed one
            soft = torch.nn.functional.one_hot(soft, self.num_classes).float()
        return mixed, soft
