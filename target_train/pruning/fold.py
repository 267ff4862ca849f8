"""Fold a pruned (or unpruned) VGG into its deployed conv+ReLU form, widths read off the layers.

``target_train.fuse.fuse`` builds the deployed model from the architecture's widths; a pruned
model has its own, so here each block becomes a ``DeployBlock`` of the folded kernel's shape.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from repopt.blocks import DeployBlock
from repopt.vgg import RepOptVGG, unwrap

from ..fuse import fold_block


@torch.no_grad()
def fold(model: nn.Module) -> RepOptVGG:
    """A new deployed model, in eval mode, computing what ``model`` computes in eval mode."""
    model = unwrap(model)
    deployed = copy.deepcopy(model)
    for spec, block in model.blocks():
        kernel, bias = fold_block(block)
        new = DeployBlock(replace(spec, in_channels=kernel.shape[1], out_channels=kernel.shape[0])).to(kernel)
        new.conv.weight.copy_(kernel)
        new.conv.bias.copy_(bias)
        deployed.set_submodule(spec.name, new)
    deployed.mode = "deploy"
    return deployed.eval()
