"""Stage two's part of the GhostNet family (docs/design.md, "The math"): re-initialization, grad
masks and deploy folding; registered in ``target_train/handler.py``.

Each ghost module's CSLA pair is the depthwise cheap operation scaled by s_cheap plus the fusion
(identity) branch scaled by s_fusion; the target keeps only the depthwise conv W. As for VGG, a
degenerate case of it (one conv branch plus the identity, depthwise):

* re-init: W <- s_cheap[c] * W + s_fusion[c] * I, I the depthwise identity (1 at the kernel centre);
* rule="sgd"   (power 2): M = s_cheap^2 everywhere, + 1 at the centre;
* rule="adamw" (power 1): M = |s_cheap|, + 1 at the centre (|s| per branch: exact for signed scales).

Only the cheap operations' depthwise weights get masks; everything else trains as usual.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from repopt.ghostnet import RepOptGhostNet
from repopt.ghostnet.blocks import depthwise_identity
from repopt.modules import fold_bn, unwrap
from repopt.scales import validate_scales

from ..masks import branch_term


def module_mask(s_cheap: torch.Tensor, kernel: int, rule: str) -> torch.Tensor:
    """The (C, 1, k, k) mask of one ghost module's depthwise conv from its cheap-operation scale."""
    mask = branch_term(s_cheap, rule).view(-1, 1, 1, 1).expand(-1, 1, kernel, kernel).clone()
    mask[:, 0, kernel // 2, kernel // 2] += 1.0
    return mask


def _target_modules(model: nn.Module):
    if not isinstance(model, RepOptGhostNet) or model.mode != "target":
        raise TypeError(
            f"the ghostnet handler needs a target RepOptGhostNet, got {type(model).__name__} "
            f"in mode {getattr(model, 'mode', None)!r}"
        )
    return model.ghost_modules()


def grad_masks(model: RepOptGhostNet, scales: Mapping[str, torch.Tensor], rule: str = "sgd") -> dict[str, torch.Tensor]:
    """Masks keyed by parameter name (``blocks.6.0.ghost1.cheap_operation.0.weight``), on the weights' device and dtype."""
    validate_scales(scales, model.arch)
    masks = {}
    for path, module in _target_modules(model):
        weight = module.dw.weight
        mask = module_mask(scales[f"{path}.cheap_operation.1.weight"].double(), weight.shape[-1], rule)
        masks[f"{path}.cheap_operation.0.weight"] = mask.to(device=weight.device, dtype=weight.dtype)
    return masks


@torch.no_grad()
def reinitialize(model: RepOptGhostNet, scales: Mapping[str, torch.Tensor], use_identity_scales: bool = True) -> RepOptGhostNet:
    """Overwrite every cheap operation's depthwise weight with its fused CSLA init; returns ``model``.

    With ``use_identity_scales=False`` the identity enters with weight 1 instead of s_fusion.
    """
    validate_scales(scales, model.arch)
    for path, module in _target_modules(model):
        w = module.dw.weight
        s_fusion = scales[f"{path}.fusion_scale.weight"].to(w)
        if not use_identity_scales:
            s_fusion = torch.ones_like(s_fusion)
        eye = depthwise_identity(w.shape[0], w.shape[-1], dtype=w.dtype, device=w.device)
        w.copy_(w * scales[f"{path}.cheap_operation.1.weight"].to(w).view(-1, 1, 1, 1) + eye * s_fusion.view(-1, 1, 1, 1))
    return model


def _cheap_operation(module) -> tuple[torch.Tensor, torch.Tensor]:
    """The (kernel, bias) of the one depthwise conv a ghost module's cheap operation + fusion + BN equal."""
    dw = module.dw
    if module.mode in ("hs", "csla"):
        return fold_bn(module.fused_kernel(), module.final_bn)
    if module.mode == "target":
        return fold_bn(dw.weight, module.final_bn)
    if module.mode == "rep":
        k, b = fold_bn(dw.weight, module.cheap_operation[1])
        eye = depthwise_identity(dw.weight.shape[0], dw.weight.shape[-1], dtype=dw.weight.dtype, device=dw.weight.device)
        ki, bi = fold_bn(eye, module.fusion_bn)
        return k + ki, b + bi
    return dw.weight.clone(), dw.bias.clone()


_BN_OF = (
    ("conv_stem", "bn1"),
    ("primary_conv.0", "primary_conv.1"),
    ("conv_dw", "bn_dw"),
    ("shortcut.0", "shortcut.1"),
    ("shortcut.2", "shortcut.3"),
    ("conv", "bn1"),
)


def _bn_name(conv_name: str) -> str | None:
    for conv, bn in _BN_OF:
        if conv_name == conv or conv_name.endswith("." + conv):
            return conv_name[: len(conv_name) - len(conv)] + bn
    return None


@torch.no_grad()
def fuse(model: RepOptGhostNet) -> RepOptGhostNet:
    """A new ``mode="deploy"`` model, in eval mode, computing what ``model`` computes in eval mode:
    every BN folded into its conv, the fusion branch (scale or BN) into the cheap operation."""
    model = unwrap(model)
    ref = next(model.parameters())
    deployed = RepOptGhostNet(model.arch, model.num_classes, mode="deploy").to(device=ref.device, dtype=ref.dtype)
    ghost = dict(model.ghost_modules())
    for name, conv in deployed.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        source = model.get_submodule(name)
        owner = name.removesuffix(".cheap_operation.0")
        bn_name = _bn_name(name)
        bn = model.get_submodule(bn_name) if bn_name is not None else None
        if owner in ghost and owner != name:
            kernel, bias = _cheap_operation(ghost[owner])
        elif isinstance(bn, nn.BatchNorm2d):
            kernel, bias = fold_bn(source.weight, bn)
        else:  # SE and head convs have a bias and no BN; a deploy model's convs are already folded
            kernel, bias = source.weight, source.bias
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
    deployed.classifier.load_state_dict(model.classifier.state_dict())
    return deployed.eval()
