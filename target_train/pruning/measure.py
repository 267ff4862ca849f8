"""What a pruned model costs: parameters and MACs of the deployed form (latency: ``quantize.latency_table``)."""

from __future__ import annotations

import torch
from torch import nn

from .channels import require_torch_pruning


def params_and_macs(deployed: nn.Module, image_size: int) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image) of a deployed model, counted by Torch-Pruning."""
    tp = require_torch_pruning()
    ref = next(deployed.parameters())
    example = torch.zeros(1, 3, image_size, image_size, device=ref.device, dtype=ref.dtype)
    macs, params = tp.utils.count_ops_and_params(deployed, example)
    return int(params), int(macs)
