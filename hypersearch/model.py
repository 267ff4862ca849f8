"""The Hyper-Search model (CSLA with learnable scales) of any family, and the export of its scales."""

from __future__ import annotations

import torch
from torch import nn

from repopt.errors import ConfigError
from repopt.family import build_model
from repopt.family_record import CSLA_MODES
from repopt.modules import unwrap


def build_hs_model(arch, num_classes: int, mode: str = "hs", fused_forward: bool = False) -> nn.Module:
    """A CSLA network: ``mode="hs"`` learns every scale, ``"csla"`` only the identity scales."""
    if mode not in CSLA_MODES:
        raise ConfigError(f"build_hs_model mode must be 'hs' or 'csla', got {mode!r}")
    return build_model(arch, num_classes, mode=mode, fused_forward=fused_forward)


def extract_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """The learned scales as detached float32 CPU tensors under the official key names."""
    model = unwrap(model)
    if getattr(model, "mode", None) not in CSLA_MODES or not hasattr(model, "scale_parameters"):
        raise ValueError("extract_scales: the model has no CSLA blocks (build it with build_hs_model)")
    return {key: p.detach().to("cpu", torch.float32).clone() for key, p in model.scale_parameters().items()}
