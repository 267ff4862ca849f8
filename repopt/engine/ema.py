"""An exponential moving average (EMA) of the weights, with torch's own ``AveragedModel``.

``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)`` holds a
copy of the model and, at each update, moves every parameter *and buffer* towards the model's:
``ema = decay * ema + (1 - decay) * w`` (one ``torch._foreach_lerp_`` per device and dtype), so
the BN running statistics are averaged as well and the copy can be evaluated as it is. Its
first update copies the weights (``n_averaged == 0``). Integer buffers (BN's
``num_batches_tracked``) follow the same formula, truncated to an integer; BN with a momentum
does not read them. The counter ``n_averaged`` lives on the CPU, so an update never waits for
the GPU.

The trainer updates the EMA after every ``every``-th optimizer step (by the run's global step,
so a resumed run updates at the same steps), from the raw module (``unwrap``: the parameters a
compiled or DDP-wrapped model trains), and checkpoints it in ``last.pt`` under ``ema``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import EMAConfig
from ..modules import unwrap


class WeightEMA:
    """The EMA of ``model``'s weights and buffers; ``module`` is the averaged copy (an ``nn.Module``)."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1):
        self.source = unwrap(model)
        self.decay, self.every = float(decay), int(every)
        self.averaged = AveragedModel(self.source, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        self.averaged.requires_grad_(False)

    @classmethod
    def build(cls, cfg: EMAConfig, model: nn.Module) -> WeightEMA | None:
        """The EMA of a run, or None when ``ema.enabled`` is off."""
        return cls(model, cfg.decay, cfg.every) if cfg.enabled else None

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class and state-dict keys as the source)."""
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def step(self, global_step: int) -> bool:
        """Call after optimizer step ``global_step`` (1-based); updates on every ``every``-th. True if it did."""
        if global_step % self.every:
            return False
        self.averaged.update_parameters(self.source)
        return True

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)
