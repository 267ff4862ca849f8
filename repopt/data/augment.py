"""Batched augmentation on the device: random crop with zero padding, flip, resize, normalize."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def crop_params(n: int, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample ``(dy, dx, flip)`` as an int64 (3, n) CPU tensor: offsets in [0, 2*padding], flip in {0, 1}."""
    params = torch.zeros(3, n, dtype=torch.int64)
    if padding > 0:
        params[:2] = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    if hflip:
        params[2] = (torch.rand(n, generator=generator) < 0.5).to(torch.int64)
    return params


def crop_flip(images: torch.Tensor, params: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each image of ``images`` (N, C, H, W) from its zero-padded copy and flip it if asked.

    ``params`` is (3, N): the crop offsets (dy, dx) into the padded image and the flip flag. The
    whole batch is padded once and every crop (flipped or not) is gathered with one ``torch.gather``
    of per-sample linear indices, so there is no Python loop over samples. Output: contiguous NCHW,
    same dtype as the input.
    """
    n, c, h, w = images.shape
    if n == 0:
        return images
    params = params.to(images.device)
    dy, dx, flip = params[0], params[1], params[2].bool()
    padded = F.pad(images, (padding, padding, padding, padding)) if padding > 0 else images
    wp = w + 2 * padding
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = dy[:, None] + ar_h  # (N, H)
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # (N, W)
    lin = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    out = torch.gather(padded.reshape(n, c, -1), 2, lin)
    return out.view(n, c, h, w)


def normalizer(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, bias)`` of shape (1, C, 1, 1) with ``x_uint8 * scale + bias == (x / 255 - mean) / std``."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * s), -m / s


def to_float(images: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, size: Optional[int] = None) -> torch.Tensor:
    """uint8 NCHW to normalized float32 NCHW, resized (bilinear, antialiased) to ``size`` if it differs."""
    x = images.to(torch.float32)
    if size is not None and (x.shape[-2] != size or x.shape[-1] != size) and x.shape[0] > 0:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0, 255)
    return x.mul_(scale).add_(bias)
