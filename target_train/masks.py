"""What every family's grad masks share: one scaled branch's share of a mask under each rule, and
name-keyed masks re-keyed as the optimizers take them (the masks themselves: ``target_train/families/``)."""

from __future__ import annotations

from typing import Mapping

import torch

from repopt.errors import ConfigError


def branch_term(scale: torch.Tensor, rule: str) -> torch.Tensor:
    """A branch's share of the mask from its scale: s^2 for SGD, |s| for AdamW (docs/design.md, "AdamW masks (|s|, per branch)")."""
    if rule == "sgd":
        return scale.square()
    if rule == "adamw":
        return scale.abs()
    raise ConfigError(f"unknown grad-mask rule {rule!r}; choose 'sgd' or 'adamw'")


def masks_by_param(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Re-key name-keyed masks by Parameter, as the optimizers take them (the official grad_mult_map)."""
    params = dict(model.named_parameters())
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise ConfigError(f"masks name parameters the model does not have: {unknown[:3]}")
    return {params[n]: m for n, m in masks.items()}
