"""The RepOptimizer after pruning: grad masks and scales sliced with the kept channels.

A block's mask M (C_out, C_in, 3, 3) is sliced to M[kept_out][:, kept_in] and its scales to
s[kept_out]. The identity branch then no longer is a square diagonal: it maps kept input channel
b to kept output channel a exactly when both were the same channel before pruning
(``identity_pairs``). ``rebuild_masks`` builds the masks from the sliced scales and those pairs;
it must give the sliced masks back (docs/design.md, "Pruning").
"""

from __future__ import annotations

from typing import Mapping

import torch

from repopt.scales import parse_scale_key
from repopt.vgg.arch import ArchSpec

from ..families.vgg import block_mask
from .channels import ChannelPlan


def identity_pairs(kept_out, kept_in) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols): the positions in the pruned block where an output is its own input."""
    where_in = {c: b for b, c in enumerate(kept_in)}
    pairs = [(a, where_in[c]) for a, c in enumerate(kept_out) if c in where_in]
    rows = torch.tensor([a for a, _ in pairs], dtype=torch.long)
    cols = torch.tensor([b for _, b in pairs], dtype=torch.long)
    return rows, cols


def slice_masks(masks: Mapping[str, torch.Tensor], plan: ChannelPlan) -> dict[str, torch.Tensor]:
    """Masks keyed ``<block>.conv.weight`` (the unpruned target's), cut to the pruned convs."""
    sliced = {}
    for name in plan.names:
        key = f"{name}.conv.weight"
        mask = masks[key]
        out, inp = plan.index(name, "out").to(mask.device), plan.index(name, "in").to(mask.device)
        sliced[key] = mask.index_select(0, out).index_select(1, inp).contiguous()
    return sliced


def slice_scales(scales: Mapping[str, torch.Tensor], plan: ChannelPlan) -> dict[str, torch.Tensor]:
    """Every per-output-channel scale of a block, cut to the block's kept outputs."""
    sliced = {}
    for key, value in scales.items():
        parsed = parse_scale_key(key)  # ("vgg", "<block>", "scale_conv")
        if parsed is not None and parsed[1] in plan.kept:
            sliced[key] = value.index_select(0, plan.index(parsed[1], "out").to(value.device))
    return sliced


def rebuild_masks(
    arch: ArchSpec, plan: ChannelPlan, sliced_scales: Mapping[str, torch.Tensor], rule: str
) -> dict[str, torch.Tensor]:
    """The pruned model's masks from its sliced scales and the kept-channel identity pairs."""
    masks = {}
    for spec in arch.blocks:
        s = lambda kind: sliced_scales[f"{spec.name}.{kind}.weight"].double()  # noqa: E731, B023 (used in this iteration only)
        kept_out, kept_in = plan.kept[spec.name], plan.kept_in(spec.name)
        s_id = s("scale_identity") if spec.has_identity else None
        identity = identity_pairs(kept_out, kept_in) if spec.has_identity else None
        masks[f"{spec.name}.conv.weight"] = block_mask(s("scale_conv"), s("scale_1x1"), s_id, len(kept_in), rule, identity)
    return masks
