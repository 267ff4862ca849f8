"""The modules of RepOpt-GhostNet, one class per part, each in every mode (docs/design.md, "The model family").

Official names throughout, so scales files, checkpoints and folded weights line up by key:
``primary_conv``, ``cheap_operation`` (depthwise conv, then the per-mode layer at index 1),
``fusion_scale`` / ``fusion_bn``, ``final_bn``; ``conv_dw``/``bn_dw``, ``se``, ``shortcut``.

A ghost module computes x1 = primary(x), then in each mode:

* ``hs`` / ``csla``: BN(s_cheap * dw(x1) + s_fusion * x1) (csla: s_cheap constant, s_fusion learns);
* ``target``: BN(dw(x1)) — the fusion branch is gone, the RepOptimizer puts it back in the update;
* ``rep``: BN_cheap(dw(x1)) + BN_fusion(x1) (the RepGhostNet baseline; folds into one dw conv);
* ``deploy``: dw(x1) with a bias — every BN folded.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..csla import ScaleLayer
from ..errors import ConfigError
from .arch import BottleneckSpec, cheap_scale_init, make_divisible

GHOST_MODES = ("hs", "csla", "target", "rep", "deploy")


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, deploy: bool = False) -> nn.Sequential:
    """conv -> BN as ``[0]`` and ``[1]``; in deploy mode a conv with bias and an empty slot."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=deploy)
    return nn.Sequential(conv, nn.Identity() if deploy else nn.BatchNorm2d(out_ch))


def depthwise_identity(channels: int, kernel: int, dtype=None, device=None) -> torch.Tensor:
    """A (C, 1, k, k) depthwise kernel that is 1 at the centre: the identity as a depthwise conv."""
    eye = torch.zeros(channels, 1, kernel, kernel, dtype=dtype, device=device)
    eye[:, 0, kernel // 2, kernel // 2] = 1.0
    return eye


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """relu6(x + 3) / 6, written as the official ``hard_sigmoid``: ``F.hardsigmoid`` computes the same
    forward, but its float64 backward multiplies by float32(1/6), 3e-8 off the exact division."""
    return F.relu6(x + 3.0) / 6.0


class SqueezeExcite(nn.Module):
    """Channel gate: x * hard_sigmoid(expand(relu(reduce(avgpool(x)))))."""

    def __init__(self, channels: int, se_ratio: float):
        super().__init__()
        reduced = make_divisible(channels * se_ratio)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = nn.ReLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * hard_sigmoid(self.conv_expand(self.act1(self.conv_reduce(self.avg_pool(x)))))


class ConvBnAct(nn.Module):
    """1x1 conv -> BN -> ReLU after the last bottleneck (``bn1`` is empty in deploy mode)."""

    def __init__(self, in_ch: int, out_ch: int, deploy: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, 1, 0, bias=deploy)
        self.bn1 = nn.Identity() if deploy else nn.BatchNorm2d(out_ch)
        self.act1 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv(x)))


class GhostModule(nn.Module):
    """1x1 primary conv, depthwise cheap operation plus the fusion (identity) branch, one BN, ReLU."""

    def __init__(
        self, in_ch: int, out_ch: int, dw_kernel: int, relu: bool, mode: str, module_index: int = 1, fused_forward: bool = False
    ):
        super().__init__()
        if mode not in GHOST_MODES:
            raise ConfigError(f"unknown ghostnet mode {mode!r}; choose one of {', '.join(GHOST_MODES)}")
        deploy = mode == "deploy"
        self.mode, self.fused_forward = mode, fused_forward and mode in ("hs", "csla")
        primary = conv_bn(in_ch, out_ch, 1, deploy=deploy)
        self.primary_conv = nn.Sequential(primary[0], primary[1], nn.ReLU() if relu else nn.Sequential())
        dw = nn.Conv2d(out_ch, out_ch, dw_kernel, 1, dw_kernel // 2, groups=out_ch, bias=deploy)
        if mode in ("hs", "csla"):
            self.fusion_scale = ScaleLayer(out_ch, 1.0)
            after = ScaleLayer(out_ch, cheap_scale_init(module_index))
            if mode == "csla":
                after.requires_grad_(False)
            self.final_bn = nn.BatchNorm2d(out_ch)
        elif mode == "rep":
            self.fusion_bn = nn.BatchNorm2d(out_ch)
            after = nn.BatchNorm2d(out_ch)
            self.final_bn = nn.Identity()
        elif mode == "target":
            after = nn.Identity()
            self.final_bn = nn.BatchNorm2d(out_ch)
        else:
            after, self.final_bn = nn.Identity(), nn.Identity()
        self.cheap_operation = nn.Sequential(dw, after)
        self.relu = nn.ReLU() if relu else nn.Identity()

    @property
    def dw(self) -> nn.Conv2d:
        return self.cheap_operation[0]

    def fused_kernel(self) -> torch.Tensor:
        """s_cheap * W_dw + s_fusion * I: the one depthwise kernel the two CSLA branches sum to."""
        w = self.dw.weight * self.cheap_operation[1].weight.view(-1, 1, 1, 1)  # a fresh tensor
        k = w.shape[-1] // 2
        w[:, 0, k, k] += self.fusion_scale.weight
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        if self.fused_forward:
            x2 = F.conv2d(x1, self.fused_kernel(), None, 1, self.dw.padding, 1, self.dw.groups)
        else:
            x2 = self.cheap_operation(x1)
            if hasattr(self, "fusion_scale"):
                x2 = x2 + self.fusion_scale(x1)
            elif hasattr(self, "fusion_bn"):
                x2 = x2 + self.fusion_bn(x1)
        return self.relu(self.final_bn(x2))


class GhostBottleneck(nn.Module):
    """ghost1 (ReLU) -> [strided depthwise conv + BN] -> [SE] -> ghost2 (linear), plus the shortcut."""

    def __init__(self, spec: BottleneckSpec, mode: str, fused_forward: bool = False):
        super().__init__()
        deploy = mode == "deploy"
        (_, _, index1), (_, _, index2) = spec.modules()
        self.stride = spec.stride
        self.ghost1 = GhostModule(spec.in_channels, spec.mid_channels, 3, True, mode, index1, fused_forward)
        if spec.stride > 1:
            pair = conv_bn(spec.mid_channels, spec.mid_channels, spec.kernel, spec.stride, spec.mid_channels, deploy)
            self.conv_dw, self.bn_dw = pair[0], pair[1]
        self.se = SqueezeExcite(spec.mid_channels, spec.se_ratio) if spec.se_ratio > 0 else None
        self.ghost2 = GhostModule(spec.mid_channels, spec.out_channels, 3, False, mode, index2, fused_forward)
        if spec.has_identity_shortcut:
            self.shortcut = nn.Sequential()
        else:
            dw = conv_bn(spec.in_channels, spec.in_channels, spec.kernel, spec.stride, spec.in_channels, deploy)
            pw = conv_bn(spec.in_channels, spec.out_channels, 1, 1, 1, deploy)
            self.shortcut = nn.Sequential(OrderedDict([("0", dw[0]), ("1", dw[1]), ("2", pw[0]), ("3", pw[1])]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ghost1(x)
        if self.stride > 1:
            out = self.bn_dw(self.conv_dw(out))
        if self.se is not None:
            out = self.se(out)
        return self.ghost2(out) + self.shortcut(x)
