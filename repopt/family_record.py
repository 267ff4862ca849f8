"""The record a model family registers (docs/design.md, "The model family") and the CSLA modes.

Plain data, no torch: the configs are checked against the families before torch loads (a misspelt
setting is reported at once). A family's ``build`` imports its model module when called."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from torch import nn

CSLA_MODES = ("hs", "csla")  # hs: every scale learns; csla: only the identity scales learn


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
