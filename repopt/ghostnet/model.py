"""The RepOpt-GhostNet network in any mode, with the official module names (``conv_stem``, ``blocks``, ``classifier``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..csla import CSLAModel
from ..errors import ConfigError
from .arch import GhostSpec, get_ghost_arch
from .blocks import GHOST_MODES, ConvBnAct, GhostBottleneck, GhostModule


class RepOptGhostNet(CSLAModel):
    """Stem, the bottleneck groups and a 1x1 ConvBnAct as ``blocks``, pooling, 1x1 head, dropout, linear."""

    def __init__(self, arch: GhostSpec | str, num_classes: int, mode: str = "target", fused_forward: bool = False):
        super().__init__()
        arch = get_ghost_arch(arch)
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        if mode not in GHOST_MODES:
            raise ConfigError(f"unknown ghostnet mode {mode!r}; choose one of {', '.join(GHOST_MODES)}")
        self.arch, self.mode, self.num_classes = arch, mode, num_classes
        deploy = mode == "deploy"
        self.conv_stem = nn.Conv2d(3, arch.stem_channels, 3, arch.strides[0], 1, bias=deploy)
        self.bn1 = nn.Identity() if deploy else nn.BatchNorm2d(arch.stem_channels)
        self.act1 = nn.ReLU()
        groups: list[list[GhostBottleneck]] = [[] for _ in arch.layout]
        for spec in arch.bottlenecks:
            groups[int(spec.name.split(".")[1])].append(GhostBottleneck(spec, mode, fused_forward))
        last = arch.bottlenecks[-1].out_channels
        stages = [nn.Sequential(*g) for g in groups] + [nn.Sequential(ConvBnAct(last, arch.final_channels, deploy))]
        self.blocks = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(arch.final_channels, arch.feature_dim, 1, 1, 0, bias=True)
        self.act2 = nn.ReLU()
        self.dropout = arch.dropout
        self.classifier = nn.Linear(arch.feature_dim, num_classes)

    def ghost_modules(self) -> list[tuple[str, GhostModule]]:
        """(module path, ghost module) in network order: the re-parameterized units."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, GhostModule)]

    def reparam_units(self) -> list[tuple[str, nn.Module]]:
        """(target depthwise weight, ghost module) per ghost module: the unit whose CSLA pair folds into it."""
        return [(f"{path}.cheap_operation.0.weight", m) for path, m in self.ghost_modules()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        x = self.act2(self.conv_head(self.global_pool(x))).flatten(1)
        if self.dropout > 0:
            x = F.dropout(x, p=self.dropout, training=self.training)
        return self.classifier(x)
