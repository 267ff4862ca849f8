"""The GhostNet family's record for the registry (``repopt/family.py``)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..family_record import Family
from .arch import GhostSpec, get_ghost_arch, ghost_arch_names

if TYPE_CHECKING:
    from torch import nn


def build(spec, num_classes: int, mode: str, fused_forward: bool = False) -> nn.Module:
    from .model import RepOptGhostNet

    return RepOptGhostNet(spec, num_classes, mode=mode, fused_forward=fused_forward)


FAMILY = Family(
    "ghostnet",
    "RepOpt-GhostNet: RepGhost bottlenecks whose fusion branch lives in the optimizer",
    ghost_arch_names,
    get_ghost_arch,
    GhostSpec.from_dict,
    build,
    "rep",
    {"ghostnet_0_5x": "RepOptGhostNet_0_5x_scales.pth"},
    "ghostnet_0_5x",
    scale_key=re.compile(r"(?:^|\.)(blocks\.\d+\.\d+\.ghost[12])\.(fusion_scale|cheap_operation\.1)\.weight$"),
    model_key=re.compile(r"primary_conv\.0\.weight$"),
    stage_of_block=re.compile(r"^blocks\.(\d+)"),
)
