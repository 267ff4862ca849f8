"""The RepOptimizers: torch's SGD / AdamW with the gradient masks of the scales built in.

``RepOptSGD`` multiplies the masked gradients in one ``torch._foreach_mul_`` and hands over to
``torch.optim.SGD.step`` unchanged, so foreach/fused kernels, ``state_dict()`` and AMP's GradScaler
work as they do for SGD. Weight decay is then added by SGD *after* the mask, unmasked (the
official order, which is what makes the equivalence with CSLA exact).

``RepOptAdamW`` must multiply Adam's normalised *update* (not the gradient, which Adam would
normalise away) by M1 = |s_conv| + |s_1x1| + 1, elementwise. torch's AdamW has no elementwise
learning rate, so the step is AdamW's own foreach arithmetic with one extra multiply; the state
layout (``step``, ``exp_avg``, ``exp_avg_sq``) is torch's, so checkpoints interchange.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Mapping

import torch
from torch import nn

from repopt.errors import ConfigError
from repopt.optim import OPTIMIZERS, closure_loss, param_groups, plain_optimizer, sgd_options

from .handler import grad_masks as make_grad_masks
from .handler import reinitialize
from .masks import masks_by_param


def _check_masks(optimizer: torch.optim.Optimizer, grad_masks: Mapping[nn.Parameter, torch.Tensor]) -> dict:
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    masks = {}
    for param, mask in grad_masks.items():
        if not isinstance(param, torch.Tensor):
            raise ConfigError("grad_masks must map Parameters to masks; use masks_by_param(model, grad_masks(model, scales))")
        if id(param) not in owned:
            raise ConfigError("grad_masks holds a parameter that is not in the optimizer's param groups")
        if mask.shape != param.shape:
            raise ConfigError(f"grad mask of shape {tuple(mask.shape)} does not fit its parameter of shape {tuple(param.shape)}")
        masks[param] = mask.to(device=param.device, dtype=param.dtype)
    return masks


@torch.no_grad()
def _masked_sgd(params, grads, bufs, masks, lr: torch.Tensor, weight_decay: torch.Tensor, momentum: float,
                nesterov: bool, maximize: bool) -> None:
    """d = M*g + wd*p; buf = momentum*buf + d; p -= lr*(d + momentum*buf if nesterov else buf).

    Written per tensor so that ``torch.compile`` emits one loop reading p, g, M and buf once: the
    mask costs one extra read instead of a whole extra pass over the gradients.
    """
    for p, g, buf, m in zip(params, grads, bufs, masks):
        d = g * m if m is not None else g
        if maximize:
            d = -d
        d = d + weight_decay * p
        if momentum != 0:
            buf.mul_(momentum).add_(d)
            d = d + momentum * buf if nesterov else buf
        p.sub_(lr * d)


@functools.cache
def _masked_sgd_kernel():
    return torch.compile(_masked_sgd, fullgraph=True, dynamic=False)


class RepOptSGD(torch.optim.SGD):
    """SGD whose gradients are multiplied by per-parameter masks before the usual update.

    ``compiled=True`` updates every parameter with one ``torch.compile``-d kernel that applies
    mask, decay, momentum and step in a single pass; the state layout (``momentum_buffer``) is
    torch's either way. It needs ``dampening=0``.
    """

    def __init__(self, params, grad_masks: Mapping[nn.Parameter, torch.Tensor], lr: float = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None, compiled: bool = False):
        if compiled and dampening != 0:
            raise ConfigError("RepOptSGD(compiled=True) supports dampening=0 only")
        if compiled:
            fused = False  # torch's kernels are not used; GradScaler then unscales the grads before step()
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach, fused=fused)
        self.compiled = compiled
        self.grad_masks = _check_masks(self, grad_masks)
        self._scalars: dict[tuple, torch.Tensor] = {}

    def _scalar(self, name: str, index: int, value: float, like: torch.Tensor) -> torch.Tensor:
        """A 0-d tensor holding ``value``: a changing lr must not recompile the kernel."""
        key = (name, index, like.device, like.dtype)
        t = self._scalars.get(key)
        if t is None:
            t = self._scalars[key] = torch.zeros((), device=like.device, dtype=like.dtype)
        t.fill_(value)
        return t

    @torch.no_grad()
    def _compiled_update(self) -> None:
        kernel = _masked_sgd_kernel()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs = []
            for p in params:
                state = self.state[p]
                if group["momentum"] != 0 and state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p)  # first step: 0*mom + d == torch's clone(d)
                bufs.append(state.get("momentum_buffer"))
            kernel(params, [p.grad for p in params], bufs, [self.grad_masks.get(p) for p in params],
                   self._scalar("lr", index, group["lr"], params[0]), self._scalar("wd", index, group["weight_decay"], params[0]),
                   group["momentum"], group["nesterov"], group["maximize"])

    @torch.no_grad()
    def apply_masks(self) -> None:
        """grad <- grad * M for every masked parameter that has a gradient (one foreach call)."""
        pairs = [(p.grad, m) for p, m in self.grad_masks.items() if p.grad is not None]
        if pairs:
            grads, masks = zip(*pairs)
            torch._foreach_mul_(list(grads), list(masks))

    def step(self, closure=None):
        loss = closure_loss(closure)
        if self.compiled:
            self._compiled_update()
        else:
            self.apply_masks()
            super().step()
        return loss


class RepOptAdamW(torch.optim.AdamW):
    """AdamW whose per-weight update is multiplied elementwise by the masks (decay stays decoupled)."""

    def __init__(self, params, grad_masks: Mapping[nn.Parameter, torch.Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 maximize: bool = False, foreach: bool | None = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False,
                         maximize=maximize, foreach=foreach)
        self.grad_masks = _check_masks(self, grad_masks)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            buckets: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RepOptAdamW does not support sparse gradients")
                buckets.setdefault((p.device, p.dtype), []).append(p)
            for params in buckets.values():
                self._step_bucket(group, params)
        return loss

    def _step_bucket(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        states = [self._init_state(p) for p in params]
        grads = [p.grad for p in params]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        step_values = [float(s) for s in steps]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1.0 - beta2 ** t) for t in step_values])
        torch._foreach_add_(denom, eps)
        masked = [(d, self.grad_masks[p]) for d, p in zip(denom, params) if p in self.grad_masks]
        if masked:  # m / (denom / M) == M * m / denom: the mask enters without another full-size buffer
            torch._foreach_div_([d for d, _ in masked], [m for _, m in masked])
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1 ** t) for t in step_values])


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, *, scales: Mapping[str, torch.Tensor] | None = None,
                    masks: Mapping[str, torch.Tensor] | None = None, momentum: float = 0.9, nesterov: bool = True, betas: Iterable[float] = (0.9, 0.999), eps: float = 1e-8,
                    foreach: bool | None = None, fused: bool | None = None, compiled: bool = False) -> torch.optim.Optimizer:
    """SGD / AdamW over the official decay groups; with ``scales``, the RepOptimizer with their masks.

    The masks follow the optimizer (power 2 for SGD, |s| for AdamW). Re-initialization is separate
    (``reinitialize``) because a resumed run must not re-initialize; ``build_repopt`` does both.
    ``masks`` (name-keyed, built for this optimizer's rule) replaces ``scales`` where the masks no
    longer follow from the architecture: a pruned model's sliced masks (``target_train/pruning``).
    """
    groups = param_groups(model, weight_decay)
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if scales is not None and masks is not None:
        raise ConfigError("pass scales or masks, not both: the masks are either built from the scales or given")
    if scales is None and masks is None:
        return plain_optimizer(groups, name, lr, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps,
                               foreach=foreach, fused=fused)
    if getattr(model, "mode", None) != "target":
        raise ConfigError("scales (grad masks) apply to the straight-through target model only")
    by_param = masks_by_param(model, make_grad_masks(model, scales, rule=name) if masks is None else masks)
    if name == "sgd":
        return RepOptSGD(groups, by_param, lr=lr, compiled=compiled, **sgd_options(groups, momentum, nesterov, foreach, fused))
    return RepOptAdamW(groups, by_param, lr=lr, betas=tuple(betas), eps=eps, foreach=foreach)


def build_repopt(model: nn.Module, scales: Mapping[str, torch.Tensor], name: str = "sgd", lr: float = 0.1,
                 weight_decay: float = 4e-5, use_identity_scales: bool = True, **kwargs) -> torch.optim.Optimizer:
    """One call: re-initialize ``model`` from ``scales``, build the masks and the RepOptimizer."""
    reinitialize(model, scales, use_identity_scales=use_identity_scales)
    return build_optimizer(model, name, lr, weight_decay, scales=scales, **kwargs)
