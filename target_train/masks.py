"""The gradient masks ("grad mults") of RepOpt-VGG (docs/design.md, "The math"); other families: handler.py.

rule="sgd"   (power 2): M = s_conv^2 everywhere, + s_1x1^2 at the kernel centre,
                        + 1 on the centre of the identity diagonal.
rule="adamw" (power 1): M = |s_conv|, + |s_1x1| at the centre, + 1 on the identity diagonal.
                        Each CSLA branch contributes |s| under Adam's per-weight normalisation;
                        summing signed scales first (|a+b+1|) is wrong for negative scales.
Only the 3x3 conv weights of the target get masks; BN and the classifier update normally.
"""

from __future__ import annotations

from typing import Mapping

import torch

from repopt.errors import ConfigError
from repopt.scales import validate_scales
from repopt.vgg import RepOptVGG

RULES = ("sgd", "adamw")


def block_mask(s_conv: torch.Tensor, s_1x1: torch.Tensor, s_id: torch.Tensor | None, in_channels: int, rule: str,
               identity: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The (C_out, C_in, 3, 3) mask of one block from its scale vectors.

    The identity branch (``s_id`` given) adds 1 at the centre of the diagonal, or at the
    (output, input) pairs ``identity`` lists: after channel pruning the identity is a selection
    of the kept channels, not a square diagonal (``target_train/pruning/masks.py``).
    """
    if rule == "sgd":
        a, b = s_conv.square(), s_1x1.square()
    elif rule == "adamw":
        a, b = s_conv.abs(), s_1x1.abs()
    else:
        raise ConfigError(f"unknown grad-mask rule {rule!r}; choose 'sgd' or 'adamw'")
    out_channels = s_conv.shape[0]
    mask = a.view(-1, 1, 1, 1).expand(out_channels, in_channels, 3, 3).clone()
    mask[:, :, 1, 1] += b.view(-1, 1)
    if s_id is not None:
        if identity is None:
            idx = torch.arange(out_channels, device=mask.device)
            identity = (idx, idx)
        rows, cols = identity
        mask[rows, cols, 1, 1] += 1.0
    return mask


def grad_masks(model: RepOptVGG, scales: Mapping[str, torch.Tensor], rule: str = "sgd") -> dict[str, torch.Tensor]:
    """Masks keyed by parameter name (``stage1.0.conv.weight``), on the weights' device and dtype."""
    validate_scales(scales, model.arch)
    params = dict(model.named_parameters())
    masks = {}
    for spec in model.arch.blocks:
        name = f"{spec.name}.conv.weight"
        weight = params[name]
        s_id = scales.get(f"{spec.name}.scale_identity.weight") if spec.has_identity else None
        mask = block_mask(scales[f"{spec.name}.scale_conv.weight"].double(), scales[f"{spec.name}.scale_1x1.weight"].double(),
                          s_id, spec.in_channels, rule)
        masks[name] = mask.to(device=weight.device, dtype=weight.dtype)
    return masks


def masks_by_param(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Re-key name-keyed masks by Parameter, as the optimizers take them (the official grad_mult_map)."""
    params = dict(model.named_parameters())
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise ConfigError(f"masks name parameters the model does not have: {unknown[:3]}")
    return {params[n]: m for n, m in masks.items()}
