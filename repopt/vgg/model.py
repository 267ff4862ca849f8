"""The VGG skeleton shared by every mode: five stages of blocks, global pooling, a linear head."""

from __future__ import annotations

from torch import nn

from ..csla import CSLAModel
from ..errors import ConfigError
from ..family_record import CSLA_MODES
from .arch import ArchSpec, BlockSpec, get_arch
from .blocks import CSLABlock, DeployBlock, QARepVGGBlock, RepVGGBlock, TargetBlock

MODES = ("hs", "csla", "target", "repvgg", "qarepvgg", "deploy")


def make_block(spec: BlockSpec, mode: str, fused_forward: bool = False) -> nn.Module:
    if mode in CSLA_MODES:
        return CSLABlock(spec, mode, fused_forward=fused_forward)
    if mode == "target":
        return TargetBlock(spec)
    if mode == "repvgg":
        return RepVGGBlock(spec)
    if mode == "qarepvgg":
        return QARepVGGBlock(spec)
    if mode == "deploy":
        return DeployBlock(spec)
    raise ConfigError(f"unknown model mode {mode!r}; choose one of {', '.join(MODES)}")


class RepOptVGG(CSLAModel):
    """RepOpt-VGG in any mode, with the official module names (``stage0``, ``stage1.0``, ``linear``)."""

    def __init__(self, arch: ArchSpec | str, num_classes: int, mode: str = "target", fused_forward: bool = False):
        super().__init__()
        arch = get_arch(arch)
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        self.arch = arch
        self.mode = mode
        self.num_classes = num_classes
        blocks = list(arch.blocks)
        self.stage0 = make_block(blocks[0], mode, fused_forward)
        for stage in range(1, 5):
            stage_blocks = [make_block(b, mode, fused_forward) for b in blocks if b.stage == stage]
            setattr(self, f"stage{stage}", nn.Sequential(*stage_blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(arch.feature_dim, num_classes)

    def blocks(self):
        """(BlockSpec, module) pairs in network order."""
        modules = dict(self.named_modules())
        return [(spec, modules[spec.name]) for spec in self.arch.blocks]

    def reparam_units(self) -> list[tuple[str, nn.Module]]:
        """(target conv weight, CSLA block) per block: the unit each block's branches fold into."""
        return [(f"{spec.name}.conv.weight", block) for spec, block in self.blocks()]

    def forward(self, x):
        for stage in (self.stage0, self.stage1, self.stage2, self.stage3, self.stage4):
            x = stage(x)
        return self.linear(self.gap(x).flatten(1))
