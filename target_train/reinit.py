"""Re-initialization of the target from the scales: the imaginary CSLA block, fused at step 0.

W <- s_conv[o]*W3 + s_1x1[o]*pad(W1) + s_id[o]*I, where W3 is the conv's fresh default init, W1 a
fresh default-initialised 1x1 conv and I the identity at the kernel centre (identity blocks only).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from repopt.blocks import TargetBlock, identity_kernel
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
        conv = block.conv
        w3 = conv.weight
        one_by_one = nn.Conv2d(spec.in_channels, spec.out_channels, 1, bias=False, device=w3.device, dtype=w3.dtype)
        s_conv = scales[f"{spec.name}.scale_conv.weight"].to(w3).view(-1, 1, 1, 1)
        s_1x1 = scales[f"{spec.name}.scale_1x1.weight"].to(w3).view(-1, 1, 1, 1)
        fused = w3 * s_conv + F.pad(one_by_one.weight, [1, 1, 1, 1]) * s_1x1
        if spec.has_identity:
            s_id = scales[f"{spec.name}.scale_identity.weight"].to(w3).view(-1, 1, 1, 1)
            eye = identity_kernel(spec.out_channels, w3.dtype, w3.device)
            fused = fused + eye * (s_id if use_identity_scales else 1.0)
        conv.weight.copy_(fused)
    return model
