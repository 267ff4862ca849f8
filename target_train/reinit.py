"""Re-initialization of the target from the scales: the imaginary CSLA block, fused at step 0.

W <- s_conv[o]*W3 + s_1x1[o]*pad(W1) + s_id[o]*I, where W3 is the conv's fresh default init, W1 a
fresh default-initialised 1x1 conv and I the identity at the kernel centre (identity blocks only).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from repopt.blocks import TargetBlock, fuse_branches
from repopt.scales import validate_scales
from repopt.vgg import RepOptVGG


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
        w3.copy_(fuse_branches(w3, scales[f"{spec.name}.scale_conv.weight"].to(w3), one_by_one.weight,
                               scales[f"{spec.name}.scale_1x1.weight"].to(w3), s_id))
    return model
