"""A deterministic, learnable toy data set (class = low-frequency colour pattern + noise) for tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..errors import DataError
from .types import TensorSplits

DATA_SEED = 1234  # fixed: the data never depends on the run seed


def _templates(num_classes: int, size: int, g: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g) * 0.7 + 0.15
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _samples(templates: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k, _, size, _ = templates.shape
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    jitter = F.interpolate(torch.randn(n, 3, 2, 2, generator=g), size=(size, size), mode="bilinear", align_corners=False)
    x = templates[labels] + 0.06 * jitter + 0.05 * torch.randn(n, 1, 1, 1, generator=g)
    x = x + 0.08 * torch.randn(n, 3, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels


def load_synthetic(cfg: DataConfig) -> TensorSplits:
    k = cfg.synthetic_num_classes
    if k < 2 or cfg.synthetic_train_size < 1 or cfg.synthetic_test_size < 1:
        raise DataError(
            "data=synthetic needs data.synthetic_num_classes >= 2 and positive data.synthetic_train_size / "
            f"data.synthetic_test_size (got {k}, {cfg.synthetic_train_size}, {cfg.synthetic_test_size})"
        )
    templates = _templates(k, cfg.image_size, torch.Generator().manual_seed(DATA_SEED))
    train_x, train_y = _samples(templates, cfg.synthetic_train_size, torch.Generator().manual_seed(DATA_SEED + 1))
    test_x, test_y = _samples(templates, cfg.synthetic_test_size, torch.Generator().manual_seed(DATA_SEED + 2))
    return TensorSplits(train_x, train_y, test_x, test_y, [f"class_{i}" for i in range(k)], stats=None)
