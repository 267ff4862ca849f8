"""Stage two's part of the VGG family (docs/design.md, "The math"): re-initialization, grad masks,
deploy folding; registered in ``target_train/handler.py``.

Re-initialization (the imaginary CSLA block, fused at step 0):
    W <- s_conv[o]*W3 + s_1x1[o]*pad(W1) + s_id[o]*I, where W3 is the conv's fresh default init, W1 a
    fresh default-initialised 1x1 conv and I the identity at the kernel centre (identity blocks only).

Grad masks ("grad mults"):
    rule="sgd"   (power 2): M = s_conv^2 everywhere, + s_1x1^2 at the kernel centre,
                            + 1 on the centre of the identity diagonal.
    rule="adamw" (power 1): M = |s_conv|, + |s_1x1| at the centre, + 1 on the identity diagonal.
                            Each CSLA branch contributes |s| under Adam's per-weight normalisation;
                            summing signed scales first (|a+b+1|) is wrong for negative scales.
    Only the 3x3 conv weights of the target get masks; BN and the classifier update normally.

Deploy folding: any trained mode becomes a plain 3x3 conv(+bias) -> ReLU stack. ``target``: conv·BN
folds into one conv with bias. ``repvgg``: each branch's BN folds into its kernel, the 1x1 kernel is
padded to 3x3 and the identity becomes a diagonal kernel; the three sum. ``qarepvgg``: the 3x3
branch's BN folds into its kernel, the raw padded 1x1 kernel and the identity add to it, then the
post-sum BN folds onto that sum's kernel *and* bias (bias = (b3 - mean)*gamma/sigma + beta).
``hs``/``csla``: the scaled branches sum into one kernel first, then BN folds.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from repopt.modules import fold_bn, unwrap
from repopt.scales import validate_scales
from repopt.vgg import RepOptVGG
from repopt.vgg.blocks import CSLABlock, DeployBlock, QARepVGGBlock, RepVGGBlock, TargetBlock, fuse_branches, identity_kernel

from ..masks import branch_term


# ---------------------------------------------------------------------------- re-initialization
@torch.no_grad()
def reinitialize(model: RepOptVGG, scales: Mapping[str, torch.Tensor], use_identity_scales: bool = True) -> RepOptVGG:
    """Overwrite every target conv weight in place with its fused CSLA init; returns ``model``.

    With ``use_identity_scales=False`` the identity enters with weight 1 instead of the searched
    s_id (the official option; it makes little difference).
    """
    validate_scales(scales, model.arch)
    for spec, block in model.blocks():
        if not isinstance(block, TargetBlock):
            raise TypeError(f"reinitialize needs a target model, {spec.name} is a {type(block).__name__}")
        w3 = block.conv.weight
        one_by_one = nn.Conv2d(spec.in_channels, spec.out_channels, 1, bias=False, device=w3.device, dtype=w3.dtype)
        s_id = None
        if spec.has_identity:
            s_id = scales[f"{spec.name}.scale_identity.weight"].to(w3)
            if not use_identity_scales:
                s_id = torch.ones_like(s_id)
        w3.copy_(
            fuse_branches(
                w3,
                scales[f"{spec.name}.scale_conv.weight"].to(w3),
                one_by_one.weight,
                scales[f"{spec.name}.scale_1x1.weight"].to(w3),
                s_id,
            )
        )
    return model


# ---------------------------------------------------------------------------- grad masks
def block_mask(
    s_conv: torch.Tensor,
    s_1x1: torch.Tensor,
    s_id: torch.Tensor | None,
    in_channels: int,
    rule: str,
    identity: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The (C_out, C_in, 3, 3) mask of one block from its scale vectors.

    The identity branch (``s_id`` given) adds 1 at the centre of the diagonal, or at the
    (output, input) pairs ``identity`` lists: after channel pruning the identity is a selection
    of the kept channels, not a square diagonal (``target_train/pruning/masks.py``).
    """
    a, b = branch_term(s_conv, rule), branch_term(s_1x1, rule)
    out_channels = s_conv.shape[0]
    mask = a.view(-1, 1, 1, 1).expand(out_channels, in_channels, 3, 3).clone()
    mask[:, :, 1, 1] += b.view(-1, 1)
    if s_id is not None:
        if identity is None:
            idx = torch.arange(out_channels, device=mask.device)
            identity = (idx, idx)
        rows, cols = identity
        mask[rows, cols, 1, 1] += 1.0
    return mask


def grad_masks(model: RepOptVGG, scales: Mapping[str, torch.Tensor], rule: str = "sgd") -> dict[str, torch.Tensor]:
    """Masks keyed by parameter name (``stage1.0.conv.weight``), on the weights' device and dtype."""
    validate_scales(scales, model.arch)
    params = dict(model.named_parameters())
    masks = {}
    for spec in model.arch.blocks:
        name = f"{spec.name}.conv.weight"
        weight = params[name]
        s_id = scales.get(f"{spec.name}.scale_identity.weight") if spec.has_identity else None
        mask = block_mask(
            scales[f"{spec.name}.scale_conv.weight"].double(),
            scales[f"{spec.name}.scale_1x1.weight"].double(),
            s_id,
            spec.in_channels,
            rule,
        )
        masks[name] = mask.to(device=weight.device, dtype=weight.dtype)
    return masks


# ---------------------------------------------------------------------------- deploy folding
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
    if isinstance(block, QARepVGGBlock):
        kernel, b3 = fold_bn(block.rbr_dense.conv.weight, block.rbr_dense.bn)
        kernel = kernel + F.pad(block.rbr_1x1.weight, [1, 1, 1, 1])  # a fresh tensor: the identity adds in place
        if block.has_identity:
            kernel[:, :, 1, 1].diagonal().add_(1.0)
        bn = block.bn  # the post-sum BN scales the sum's bias b3 too, not only its kernel
        t = bn.weight / (bn.running_var + bn.eps).sqrt()
        return kernel * t.view(-1, 1, 1, 1), (b3 - bn.running_mean) * t + bn.bias
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
