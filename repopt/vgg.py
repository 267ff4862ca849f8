"""The VGG skeleton shared by every mode: five stages of blocks, global pooling, a linear head."""

from __future__ import annotations

import torch
from torch import nn

from .arch import ArchSpec, BlockSpec, get_arch
from .blocks import CSLA_MODES, CSLABlock, DeployBlock, RepVGGBlock, TargetBlock
from .errors import ConfigError

MODES = ("hs", "csla", "target", "repvgg", "deploy")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def make_block(spec: BlockSpec, mode: str, fused_forward: bool = False) -> nn.Module:
    if mode in CSLA_MODES:
        return CSLABlock(spec, mode, fused_forward=fused_forward)
    if mode == "target":
        return TargetBlock(spec)
    if mode == "repvgg":
        return RepVGGBlock(spec)
    if mode == "deploy":
        return DeployBlock(spec)
    raise ConfigError(f"unknown model mode {mode!r}; choose one of {', '.join(MODES)}")


class RepOptVGG(nn.Module):
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

    def fused_kernels(self) -> dict[str, torch.Tensor]:
        """hs/csla: the target parameter each block re-parameterizes, and the kernel its branches sum to."""
        return {f"{spec.name}.conv.weight": block.fused_kernel() for spec, block in self.blocks()}

    def scale_parameters(self) -> dict[str, nn.Parameter]:
        """The CSLA branch scales under their scales-file keys (``arch.scale_shapes()`` order); hs/csla only."""
        if self.mode not in CSLA_MODES:
            raise ConfigError(f"a {self.mode!r} model has no branch scales; build it with mode='hs' or 'csla'")
        return {key: self.get_parameter(key) for key in self.arch.scale_shapes()}

    def forward(self, x):
        for stage in (self.stage0, self.stage1, self.stage2, self.stage3, self.stage4):
            x = stage(x)
        return self.linear(self.gap(x).flatten(1))
