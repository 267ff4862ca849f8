"""What a pruned model costs: parameters and MACs of the deployed form, ONNX Runtime latency."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import quantize as q
from .channels import require_torch_pruning

LATENCY_BATCHES = (1, 32)


def params_and_macs(deployed: nn.Module, image_size: int) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image) of a deployed model, counted by Torch-Pruning."""
    tp = require_torch_pruning()
    ref = next(deployed.parameters())
    example = torch.zeros(1, 3, image_size, image_size, device=ref.device, dtype=ref.dtype)
    macs, params = tp.utils.count_ops_and_params(deployed, example)
    return int(params), int(macs)


def latency(path: Path, example: torch.Tensor, runs: int, warmup: int, threads: int | None) -> dict[str, float]:
    """Milliseconds per image through ONNX Runtime on the CPU at batch 1 and 32 (median of ``runs``)."""
    sess = q.session(path, threads)
    return {f"batch{b}": q.latency_ms_per_image(sess, example, b, runs, warmup) for b in LATENCY_BATCHES}
