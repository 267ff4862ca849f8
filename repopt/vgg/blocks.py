"""The block kinds of the VGG family, one per mode (docs/design.md, "The model family").

All of them keep the official key layout so that scale files, checkpoints and folded weights
line up by name: ``conv``/``scale_conv``/``conv_1x1``/``scale_1x1``/``scale_identity``/``bn`` for
HS/CSLA, ``conv``/``bn`` for the target, ``rbr_dense``/``rbr_1x1``/``rbr_identity`` for RepVGG,
and the same plus the post-sum ``bn`` for QARepVGG (YOLOv6's ``QARepVGGBlock`` names).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..csla import ScaleLayer
from ..errors import ConfigError
from ..family_record import CSLA_MODES
from .arch import BlockSpec


def identity_kernel(channels: int, dtype=None, device=None) -> torch.Tensor:
    """A (C, C, 3, 3) kernel that is 1 at the centre of the diagonal: the identity as a 3x3 conv."""
    kernel = torch.zeros(channels, channels, 3, 3, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    kernel[idx, idx, 1, 1] = 1.0
    return kernel


def fuse_branches(
    w3: torch.Tensor,
    s_conv: torch.Tensor,
    w1: torch.Tensor,
    s_1x1: torch.Tensor,
    s_id: torch.Tensor | None = None,
    identity: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """s_conv*W3 + s_1x1*pad(W1) (+ s_id*I): the one 3x3 kernel a CSLA block's branches sum to.

    Scales are per output channel. The identity adds s_id onto the kernel centres of the diagonal
    in place (the kernel is a fresh tensor), instead of building a dense C x C x 3 x 3 identity;
    or, with ``identity`` = (rows, cols), at the (output, input) pairs it lists (a channel-pruned
    block's identity selects the kept channels that were the same channel before pruning).
    """
    w = w3 * s_conv.view(-1, 1, 1, 1) + F.pad(w1 * s_1x1.view(-1, 1, 1, 1), [1, 1, 1, 1])
    if s_id is not None and identity is None:
        w[:, :, 1, 1].diagonal().add_(s_id)
    elif s_id is not None:
        rows, cols = identity
        w[rows, cols, 1, 1] += s_id[rows]
    return w


class CSLABlock(nn.Module):
    """3x3 conv*s_conv + 1x1 conv*s_1x1 (+ x*s_id) -> BN -> ReLU.

    ``mode="hs"`` trains every scale; ``mode="csla"`` freezes s_conv and s_1x1 (constants) and
    trains only s_id. ``fused_forward`` computes the same function as one 3x3 conv with the
    branch kernels summed (gradients reach every branch through the sum): the fast path for
    Hyper-Search, numerically equal up to rounding.
    """

    def __init__(self, spec: BlockSpec, mode: str = "hs", fused_forward: bool = False):
        super().__init__()
        if mode not in CSLA_MODES:
            raise ConfigError(f"CSLABlock mode must be 'hs' or 'csla', got {mode!r}")
        self.stride = spec.stride
        self.fused_forward = fused_forward
        self.conv = nn.Conv2d(spec.in_channels, spec.out_channels, 3, spec.stride, 1, bias=False)
        self.scale_conv = ScaleLayer(spec.out_channels, spec.init_conv_scale)
        self.conv_1x1 = nn.Conv2d(spec.in_channels, spec.out_channels, 1, spec.stride, 0, bias=False)
        self.scale_1x1 = ScaleLayer(spec.out_channels, spec.init_conv_scale)
        if spec.has_identity:
            self.scale_identity = ScaleLayer(spec.out_channels, 1.0)
        self.bn = nn.BatchNorm2d(spec.out_channels)
        self.relu = nn.ReLU()
        if mode == "csla":
            self.scale_conv.requires_grad_(False)
            self.scale_1x1.requires_grad_(False)

    @property
    def has_identity(self) -> bool:
        return hasattr(self, "scale_identity")

    def fused_kernel(self) -> torch.Tensor:
        """s_conv*W3 + s_1x1*pad(W1) (+ s_id*I): the equivalent single 3x3 kernel."""
        return fuse_branches(
            self.conv.weight,
            self.scale_conv.weight,
            self.conv_1x1.weight,
            self.scale_1x1.weight,
            self.scale_identity.weight if self.has_identity else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_forward:
            out = F.conv2d(x, self.fused_kernel(), None, self.stride, 1)
        else:
            out = self.scale_conv(self.conv(x)) + self.scale_1x1(self.conv_1x1(x))
            if self.has_identity:
                out = out + self.scale_identity(x)
        return self.relu(self.bn(out))


class TargetBlock(nn.Module):
    """The straight-through RepOpt-VGG block: 3x3 conv (no bias) -> BN -> ReLU."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.conv = nn.Conv2d(spec.in_channels, spec.out_channels, 3, spec.stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(spec.out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_ch)))


class RepVGGBlock(nn.Module):
    """Structural re-parameterization baseline: BN(3x3) + BN(1x1) (+ BN(x)) -> ReLU."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.rbr_dense = _conv_bn(spec.in_channels, spec.out_channels, 3, spec.stride)
        self.rbr_1x1 = _conv_bn(spec.in_channels, spec.out_channels, 1, spec.stride)
        if spec.has_identity:
            self.rbr_identity = nn.BatchNorm2d(spec.out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if hasattr(self, "rbr_identity"):
            out = out + self.rbr_identity(x)
        return self.relu(out)


class QARepVGGBlock(nn.Module):
    """The quantization-friendly baseline (QARepVGG, Chu et al. 2022; YOLOv6 v3):
    BN(BN(3x3) + 1x1 (+ x)) -> ReLU.

    Only the 3x3 branch keeps its own BN; the 1x1 conv (no bias) and the identity enter the sum
    unnormalized and one BN follows the sum. RepVGG's per-branch BNs each rescale their branch by
    gamma/sigma before the sum, so the folded kernel inherits wide, outlier-heavy per-channel ranges
    that INT8 post-training quantization clips; here the sum is scaled once, as a whole. Folds
    exactly into the same ``DeployBlock`` (``target_train/families/vgg.py``, ``fold_block``).
    """

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.rbr_dense = _conv_bn(spec.in_channels, spec.out_channels, 3, spec.stride)
        self.rbr_1x1 = nn.Conv2d(spec.in_channels, spec.out_channels, 1, spec.stride, 0, bias=False)
        if spec.has_identity:
            self.rbr_identity = nn.Identity()
        self.bn = nn.BatchNorm2d(spec.out_channels)
        self.relu = nn.ReLU()

    @property
    def has_identity(self) -> bool:
        return hasattr(self, "rbr_identity")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.has_identity:
            out = out + self.rbr_identity(x)
        return self.relu(self.bn(out))


class DeployBlock(nn.Module):
    """The deployed block: 3x3 conv with bias -> ReLU (BN and branches folded in)."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.conv = nn.Conv2d(spec.in_channels, spec.out_channels, 3, spec.stride, 1, bias=True)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))
