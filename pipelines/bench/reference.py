"""Per-parameter Python-loop optimizers with gradient masks: the baselines of the ``opt`` section.

``LoopMaskedSGD`` performs the official RepOptimizer SGD step op for op (the "official
per-parameter-loop optimizer" of docs/design.md, "Performance"): one Python iteration and a
handful of out-of-place kernels per parameter, including its in-place weight decay on the
gradients of unmasked parameters. ``LoopMaskedAdamW`` is the same style for AdamW. Both compute
what ``RepOptSGD`` / ``RepOptAdamW`` compute, which ``tests/test_benchmark.py`` checks, so the
speed comparison is like for like.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from repopt.optim import closure_loss


class LoopMaskedSGD(torch.optim.Optimizer):
    """for each p: d_p = grad*mask (or grad itself); d_p += wd*p; buf = m*buf + (1-dampening)*d_p;
    d_p = d_p + buf*m (Nesterov) or buf; p -= lr*d_p. Unmasked gradients are modified in place."""

    def __init__(
        self,
        params,
        grad_masks: Mapping[torch.Tensor, torch.Tensor],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ):
        super().__init__(
            params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        )
        self.grad_masks = dict(grad_masks)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
            wd, nesterov = group["weight_decay"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                mask = self.grad_masks.get(p)
                d_p = p.grad * mask if mask is not None else p.grad
                if wd != 0:
                    d_p.add_(p, alpha=wd)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d_p).detach()
                    else:
                        buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
                    d_p = d_p + buf * momentum if nesterov else buf
                p.add_(d_p, alpha=-lr)
        return loss


class LoopMaskedAdamW(torch.optim.Optimizer):
    """Per-parameter AdamW whose normalized update is multiplied by the mask (decay stays decoupled)."""

    def __init__(
        self,
        params,
        grad_masks: Mapping[torch.Tensor, torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.grad_masks = dict(grad_masks)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if wd != 0:
                    p.mul_(1.0 - lr * wd)
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**t)).add_(eps)
                update = exp_avg / denom
                mask = self.grad_masks.get(p)
                if mask is not None:
                    update.mul_(mask)
                p.add_(update, alpha=-lr / (1.0 - beta1**t))
        return loss
