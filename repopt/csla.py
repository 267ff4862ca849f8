"""What every family's modules share (docs/design.md, "The model family"): the learnable per-channel
scale and the two views of a CSLA model that stage one and the checks use (its scale parameters under
their scales-file keys, and the kernels its branches sum to). The ``Family`` record and the CSLA modes
are plain data in ``repopt/family_record.py``."""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .family_record import CSLA_MODES


class ScaleLayer(nn.Module):
    """A per-channel multiplier (the official ``ScaleLayer`` without bias)."""

    def __init__(self, num_features: int, scale_init: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((num_features,), float(scale_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1)


class CSLAModel(nn.Module):
    """Base of a family's model class. A family lists its re-parameterized units
    (``reparam_units``: the target parameter's name and the CSLA unit whose branches sum to it);
    ``arch.scale_shapes()`` names the scales."""

    arch: object
    mode: str

    def reparam_units(self) -> list[tuple[str, nn.Module]]:  # pragma: no cover - each family defines it
        raise NotImplementedError

    def fused_kernels(self) -> dict[str, torch.Tensor]:
        """hs/csla: the target parameter each unit re-parameterizes, and the kernel its branches sum to."""
        return {name: unit.fused_kernel() for name, unit in self.reparam_units()}

    def scale_parameters(self) -> dict[str, nn.Parameter]:
        """The CSLA branch scales under their scales-file keys (``arch.scale_shapes()`` order); hs/csla only."""
        if self.mode not in CSLA_MODES:
            raise ConfigError(f"a {self.mode!r} model has no branch scales; build it with mode='hs' or 'csla'")
        return {key: self.get_parameter(key) for key in self.arch.scale_shapes()}
