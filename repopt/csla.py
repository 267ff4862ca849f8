"""What every family shares (docs/design.md, "The model family"): the CSLA modes, the
learnable per-channel scale, the ``Family`` record a family registers, and the two views of a CSLA model that stage one and the checks use
(its scale parameters under their scales-file keys, and the kernels its branches sum to)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .errors import ConfigError

CSLA_MODES = ("hs", "csla")  # hs: every scale learns; csla: only the identity scales learn


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


@dataclass(frozen=True)
class Family:
    """One model family: its specs, how to build a model, its modes and its released scales."""

    name: str
    summary: str
    arch_names: Callable[[], list[str]]
    lookup: Callable[..., Any]  # (name | spec, strides) -> spec
    from_dict: Callable[[dict], Any]
    build: Callable[..., nn.Module]  # (spec, num_classes, mode, fused_forward) -> model
    baseline_mode: str  # the structural re-parameterization baseline trained by stage two
    official: Mapping[str, str]  # released scales: official name -> packaged file
    default_arch: str
    # its scales-file keys: group 1 the block, group 2 the branch kind (``stage1.0`` / ``scale_conv``)
    scale_key: re.Pattern
    # a key only a whole HS state dict has (a conv of the model, not a scale): tells a checkpoint from a scales file
    model_key: re.Pattern
    # the stage of a block name (group 1), for per-stage summaries of the scales
    stage_of_block: re.Pattern
    overrides: tuple[str, ...] = ()  # keyword overrides ``lookup`` takes besides the name (vgg: num_blocks, width_multiplier)
    baselines: tuple[str, ...] = ()  # further re-parameterization baselines stage two can train (vgg: qarepvgg)

    @property
    def baseline_modes(self) -> tuple[str, ...]:
        """Every baseline stage two trains with a plain optimizer and folds with ``fuse``: the main one first."""
        return (self.baseline_mode, *self.baselines)

    @property
    def modes(self) -> tuple[str, ...]:
        return (*CSLA_MODES, "target", *self.baseline_modes, "deploy")
