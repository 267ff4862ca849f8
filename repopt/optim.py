"""The official weight-decay grouping and plain torch optimizers built from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import OPTIMIZERS
from .errors import ConfigError

IDENTITY_SCALES = ("scale_identity.weight", "fusion_scale.weight")  # the weight-decayed 1-D scales


def param_groups(model: nn.Module, weight_decay: float | None = None) -> list[dict]:
    """Decay conv/linear weights and identity scales; not BN, biases or the other 1-D scales.

    The identity scales are VGG's ``scale_identity`` and GhostNet's ``fusion_scale`` (its identity
    branch). Decaying them is what makes CSLA with weight decay equal the target, whose fused kernel
    is decayed whole (docs/design.md, "The math"); the official GhostNet grouping leaves the fusion
    scale undecayed.

    As the official ``set_weight_decay``: without ``weight_decay`` the decay group carries no
    ``weight_decay`` key, so the optimizer's own ``weight_decay=`` applies to it; the no-decay
    group always says 0.0.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim > 1 or name.endswith(IDENTITY_SCALES):
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [{"params": decay} if weight_decay is None else {"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def default_fused(groups: list[dict], foreach: bool | None, fused: bool | None) -> bool | None:
    """SGD's fused kernel (one pass over p, grad and buffer) unless the caller chose: torch's own
    default is the slower foreach path. Fused needs floating parameters on CPU or CUDA."""
    if fused is not None or foreach is not None:
        return fused
    params = [p for g in groups for p in g["params"]]
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok and params else None


def sgd_options(groups: list[dict], momentum: float, nesterov: bool, foreach: bool | None, fused: bool | None) -> dict:
    """The SGD keywords both the plain and the masked SGD are built with (Nesterov needs momentum)."""
    return dict(
        momentum=momentum, nesterov=nesterov and momentum > 0, foreach=foreach, fused=default_fused(groups, foreach, fused)
    )


def closure_loss(closure):
    """torch's optimizer convention: re-evaluate the model with gradients on when a closure is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


@dataclass(frozen=True)
class StepOptions:
    """How an optimizer steps beyond its name, learning rate and weight decay: what the builders take
    (``OptimConfig`` holds the same as the user writes it; ``optimizer_kwargs`` converts)."""

    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    foreach: bool | None = None
    fused: bool | None = None
    compiled: bool | None = None  # stage two's RepOptSGD only: its torch.compile-d step (None: auto)


def optimizer_kwargs(cfg) -> dict:
    """The one adapter from an ``OptimConfig`` to the builders:
    ``build_plain(model, lr, **optimizer_kwargs(cfg.optim))`` (and stage two's ``build_optimizer``).
    The learning rate stays outside: the apps scale it by the batch size first."""
    return {
        "name": cfg.name,
        "weight_decay": cfg.weight_decay,
        "options": StepOptions(
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            foreach=cfg.foreach,
            fused=cfg.fused,
            compiled=cfg.compile_step,
        ),
    }


def plain_optimizer(groups: list[dict], name: str, lr: float, options: StepOptions = StepOptions()) -> torch.optim.Optimizer:
    """torch's SGD or AdamW over ``groups`` (whose entries carry their own weight decay)."""
    o = options
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, **sgd_options(groups, o.momentum, o.nesterov, o.foreach, o.fused))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, foreach=o.foreach)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def build_plain(
    model: nn.Module, lr: float, *, name: str = "sgd", weight_decay: float = 4e-5, options: StepOptions = StepOptions()
) -> torch.optim.Optimizer:
    """torch's SGD or AdamW over the official decay groups of ``model`` (stage one, and stage two
    without scales)."""
    return plain_optimizer(param_groups(model, weight_decay), name, lr, options)
