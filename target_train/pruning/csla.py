"""A CSLA model pruned with a ``ChannelPlan``: the twin that proves the pruned RepOptimizer exact.

Each branch is cut like the target's conv (outputs ``kept_out``, inputs ``kept_in``), each scale
and BN like its outputs. The identity branch keeps, for every output, the input that was the same
channel (``identity_pairs``), so the branches still sum to the pruned target's kernel, and plain
SGD on this model equals RepOptSGD with the sliced masks on the pruned target
(``tests/test_pruning.py``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from repopt.csla import ScaleLayer
from repopt.vgg import RepOptVGG
from repopt.vgg.blocks import CSLABlock, fuse_branches

from .channels import ChannelPlan
from .masks import identity_pairs


class PrunedCSLABlock(CSLABlock):
    """CSLA block whose identity is a selection: out[:, rows] += s_id[rows] * x[:, cols]."""

    def __init__(self, spec, mode: str, rows: torch.Tensor, cols: torch.Tensor):
        super().__init__(spec, mode)
        if not hasattr(self, "scale_identity"):
            self.scale_identity = ScaleLayer(spec.out_channels, 1.0)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def fused_kernel(self) -> torch.Tensor:
        return fuse_branches(
            self.conv.weight,
            self.scale_conv.weight,
            self.conv_1x1.weight,
            self.scale_1x1.weight,
            self.scale_identity.weight,
            (self.rows, self.cols),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scale_conv(self.conv(x)) + self.scale_1x1(self.conv_1x1(x))
        if self.rows.numel():  # only stride-1 blocks that had an identity
            identity = torch.zeros_like(out)
            identity[:, self.rows] = x[:, self.cols] * self.scale_identity.weight[self.rows].view(1, -1, 1, 1)
            out = out + identity
        return self.relu(self.bn(out))


def _slice_bn(bn: nn.BatchNorm2d, out: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(out), eps=bn.eps, momentum=bn.momentum).to(bn.weight)
    new.load_state_dict({k: (v.index_select(0, out) if v.ndim else v.clone()) for k, v in bn.state_dict().items()})
    return new


@torch.no_grad()
def prune_csla(model: RepOptVGG, plan: ChannelPlan) -> RepOptVGG:
    """A pruned copy of an hs/csla ``model`` (the original is left as it was)."""
    with torch.device("meta"):  # the skeleton only: every block and the classifier are replaced below
        pruned = RepOptVGG(model.arch, model.num_classes, mode=model.mode)
    for spec, block in model.blocks():
        out, inp = plan.index(spec.name, "out"), plan.index(spec.name, "in")
        rows, cols = (
            identity_pairs(plan.kept[spec.name], plan.kept_in(spec.name))
            if block.has_identity
            else (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        )
        new = PrunedCSLABlock(replace(spec, in_channels=len(inp), out_channels=len(out)), model.mode, rows, cols)
        new = new.to(block.conv.weight)
        new.conv.weight.copy_(block.conv.weight[out][:, inp])
        new.conv_1x1.weight.copy_(block.conv_1x1.weight[out][:, inp])
        new.scale_conv.weight.copy_(block.scale_conv.weight[out])
        new.scale_1x1.weight.copy_(block.scale_1x1.weight[out])
        if block.has_identity:
            new.scale_identity.weight.copy_(block.scale_identity.weight[out])
        new.bn = _slice_bn(block.bn, out)
        new.scale_identity.weight.requires_grad_(block.has_identity)  # a block without one gets an inert scale
        pruned.set_submodule(spec.name, new)
    pruned.train(model.training)
    features = torch.tensor(plan.kept_features(), dtype=torch.long)
    linear = nn.Linear(len(features), model.linear.out_features).to(model.linear.weight)
    linear.weight.copy_(model.linear.weight[:, features])
    linear.bias.copy_(model.linear.bias)
    pruned.linear = linear
    return pruned
