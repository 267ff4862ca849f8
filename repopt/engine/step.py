"""The one training step: forward, loss, backward and optimizer step, with or without AMP.

The trainer, ``target_train.verify`` and the benchmark sections all call ``TrainStep``, so the
benchmark times exactly what a run executes and the equivalence check exercises it too.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import Runtime


class TrainStep:
    """``step(x, y) -> (loss, logits)``, both detached, for one batch.

    ``model`` is what runs the forward (possibly compiled or DDP-wrapped); ``clip_params`` are
    the raw parameters that ``grad_clip`` clips. With fp16 AMP a ``GradScaler`` scales the loss
    (and unscales before clipping); bf16 and fp32 need none.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        runtime: Runtime,
        *,
        label_smoothing: float = 0.0,
        grad_clip: float | None = None,
        clip_params: Iterable[torch.Tensor] | None = None,
    ):
        self.model, self.optimizer, self.runtime = model, optimizer, runtime
        self.label_smoothing, self.grad_clip = label_smoothing, grad_clip
        self.clip_params = list(clip_params if clip_params is not None else model.parameters()) if grad_clip else []
        self.scaler = torch.amp.GradScaler(runtime.device.type) if runtime.amp_dtype == torch.float16 else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        opt, scaler = self.optimizer, self.scaler
        with self.runtime.autocast():
            logits = self.model(self.runtime.input_format(x))
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if self.grad_clip:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(self.clip_params, self.grad_clip)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if self.grad_clip:
                nn.utils.clip_grad_norm_(self.clip_params, self.grad_clip)
            opt.step()
        return loss.detach(), logits.detach()
