"""The VGG family's record for the registry (``repopt/family.py``)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..family_record import Family
from .arch import ArchSpec, arch_names, get_arch

if TYPE_CHECKING:
    from torch import nn


def build(spec, num_classes: int, mode: str, fused_forward: bool = False) -> nn.Module:
    from .model import RepOptVGG

    return RepOptVGG(spec, num_classes, mode=mode, fused_forward=fused_forward)


FAMILY = Family(
    "vgg",
    "RepOpt-VGG: plain 3x3 conv -> BN -> ReLU stages (CSLA: 3x3 + 1x1 + identity)",
    arch_names,
    get_arch,
    ArchSpec.from_dict,
    build,
    "repvgg",
    {n: f"RepOpt-VGG-{n}-scales.pth" for n in ("B1", "B2", "L1", "L2")},
    "B1",
    scale_key=re.compile(r"(?:^|\.)(stage0|stage[1-4]\.\d+)\.(scale_conv|scale_1x1|scale_identity)\.weight$"),
    model_key=re.compile(r"(?:^|\.)(conv|conv_1x1)\.weight$"),
    stage_of_block=re.compile(r"^stage(\d+)"),
    overrides=("num_blocks", "width_multiplier"),
    baselines=("qarepvgg",),
)
