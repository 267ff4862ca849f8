"""Per-channel normalization constants: the published ones, or measured from decoded pixels."""

from __future__ import annotations

import torch

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]

CIFAR100_STATS: Stats = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
CIFAR10_STATS: Stats = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
FASHIONMNIST_STATS: Stats = ((0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530))
IMAGENET_STATS: Stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def compute_stats(images: torch.Tensor) -> Stats:
    """Mean and (population) std per channel of uint8 NCHW ``images``, on the 0..1 scale.

    Exact and cheap: a 256-bin histogram per channel, then the moments of the histogram.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError("compute_stats expects a non-empty uint8 NCHW tensor")
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1).cpu(), minlength=256).to(torch.float64)
        p = hist / hist.sum()
        mean = float((p * values).sum())
        var = float((p * (values - mean) ** 2).sum())
        means.append(mean)
        stds.append(max(var**0.5, 1e-3))  # a constant channel must not divide by zero
    if len(means) == 1:
        means, stds = means * 3, stds * 3
    return (tuple(means), tuple(stds))  # type: ignore[return-value]
