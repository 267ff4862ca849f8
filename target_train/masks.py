"""Name-keyed grad masks as the optimizers take them (the family's masks: ``target_train/families/``)."""

from __future__ import annotations

from typing import Mapping

import torch

from repopt.errors import ConfigError


def masks_by_param(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Re-key name-keyed masks by Parameter, as the optimizers take them (the official grad_mult_map)."""
    params = dict(model.named_parameters())
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise ConfigError(f"masks name parameters the model does not have: {unknown[:3]}")
    return {params[n]: m for n, m in masks.items()}
