"""Stage two's part of a model family (docs/design.md, "The model family"): three functions.

* ``reinitialize(model, scales, use_identity_scales)``: the target's re-parameterized weights
  become the CSLA branches fused at step 0;
* ``grad_masks(model, scales, rule)``: the masks, keyed by parameter name, for ``rule`` sgd
  (power 2) or adamw (|s|);
* ``fuse(model)``: the deployed model (every BN and branch folded) of any trained mode.

The optimizers, the apps and the export only call the dispatching functions below. To add a
family, write its three functions in ``target_train/families/<family>.py`` and register them in
``HANDLERS`` (its specs and model class: ``repopt/<family>/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from repopt.family import family_of
from repopt.modules import unwrap

from .families import ghostnet, vgg


@dataclass(frozen=True)
class Handler:
    reinitialize: Callable[[nn.Module, Mapping[str, torch.Tensor], bool], nn.Module]
    grad_masks: Callable[[nn.Module, Mapping[str, torch.Tensor], str], dict[str, torch.Tensor]]
    fuse: Callable[[nn.Module], nn.Module]


HANDLERS: dict[str, Handler] = {
    "vgg": Handler(vgg.reinitialize, vgg.grad_masks, vgg.fuse),
    "ghostnet": Handler(ghostnet.reinitialize, ghostnet.grad_masks, ghostnet.fuse),
}


def handler_for(model_or_spec) -> Handler:
    return HANDLERS[family_of(unwrap(model_or_spec) if isinstance(model_or_spec, nn.Module) else model_or_spec).name]


def reinitialize(model: nn.Module, scales: Mapping[str, torch.Tensor], use_identity_scales: bool = True) -> nn.Module:
    return handler_for(model).reinitialize(model, scales, use_identity_scales)


def grad_masks(model: nn.Module, scales: Mapping[str, torch.Tensor], rule: str = "sgd") -> dict[str, torch.Tensor]:
    return handler_for(model).grad_masks(model, scales, rule)


def fuse(model: nn.Module) -> nn.Module:
    return handler_for(model).fuse(model)
