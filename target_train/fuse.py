"""Deploy folding: any trained mode becomes a plain 3x3 conv(+bias) -> ReLU stack.

``target``: conv·BN folds into one conv with bias. ``repvgg``: each branch's BN folds into its
kernel, the 1x1 kernel is padded to 3x3 and the identity becomes a diagonal kernel; the three
sum. ``hs``/``csla``: the scaled branches sum into one kernel first, then BN folds.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from repopt.blocks import CSLABlock, DeployBlock, RepVGGBlock, TargetBlock, identity_kernel
from repopt.vgg import RepOptVGG, unwrap


def fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, BN) -> (W*gamma/std, beta - mean*gamma/std), the eval-mode equivalent conv."""
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    t = gamma / std
    return kernel * t.view(-1, 1, 1, 1), beta - bn.running_mean * t


@torch.no_grad()
def fold_block(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The (kernel, bias) of the single 3x3 conv that equals ``block`` (before its ReLU) in eval mode."""
    if isinstance(block, TargetBlock):
        return fold_bn(block.conv.weight, block.bn)
    if isinstance(block, CSLABlock):
        return fold_bn(block.fused_kernel(), block.bn)
    if isinstance(block, RepVGGBlock):
        k3, b3 = fold_bn(block.rbr_dense.conv.weight, block.rbr_dense.bn)
        k1, b1 = fold_bn(F.pad(block.rbr_1x1.conv.weight, [1, 1, 1, 1]), block.rbr_1x1.bn)
        kernel, bias = k3 + k1, b3 + b1
        if hasattr(block, "rbr_identity"):
            eye = identity_kernel(kernel.shape[0], kernel.dtype, kernel.device)
            ki, bi = fold_bn(eye, block.rbr_identity)
            kernel, bias = kernel + ki, bias + bi
        return kernel, bias
    if isinstance(block, DeployBlock):
        return block.conv.weight.clone(), block.conv.bias.clone()
    raise TypeError(f"cannot fold a {type(block).__name__}")


@torch.no_grad()
def fuse(model: RepOptVGG) -> RepOptVGG:
    """A new ``mode="deploy"`` model, in eval mode, computing what ``model`` computes in eval mode.

    Each deployed conv takes the shape of its folded kernel, and the classifier that of the
    model's, so a channel-pruned model (``target_train/pruning``) folds like any other.
    """
    model = unwrap(model)
    with torch.device("meta"):  # the skeleton only: every block and the classifier are replaced below
        deployed = RepOptVGG(model.arch, model.num_classes, mode="deploy")
    for spec, block in model.blocks():
        kernel, bias = fold_block(block)
        folded = DeployBlock(replace(spec, in_channels=kernel.shape[1], out_channels=kernel.shape[0])).to(kernel)
        folded.conv.weight.copy_(kernel)
        folded.conv.bias.copy_(bias)
        deployed.set_submodule(spec.name, folded)
    linear = model.linear
    deployed.linear = nn.Linear(linear.in_features, linear.out_features).to(linear.weight)
    deployed.linear.load_state_dict(linear.state_dict())
    return deployed.eval()
