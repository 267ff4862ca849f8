"""A synthetic ImageFolder of large JPEGs: the target's 224 px input path without a real data set.

Each class has its own colour and coarse pattern plus per-image noise, so the files decode to
distinct images of realistic JPEG size; the folder is written once per size and reused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F


def synthetic_image_folder(
    root: Path, *, image_size: int, train_images: int, val_images: int, classes: int = 10, seed: int = 0
) -> Path:
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``; returns ``root`` (reused when complete)."""
    from PIL import Image

    marker = root / ".complete"
    wanted = f"{image_size} {train_images} {val_images} {classes} {seed}"
    if marker.is_file() and marker.read_text() == wanted:
        return root
    if root.exists():
        shutil.rmtree(root)
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(classes, 3, 7, 7, generator=g)
    for split, count in (("train", train_images), ("val", val_images)):
        for i in range(count):
            label = i % classes
            low = (patterns[label] * 0.7 + 0.3 * torch.rand(3, 7, 7, generator=g)).unsqueeze(0)
            img = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)[0]
            img = (img + 0.08 * torch.randn(img.shape, generator=g)).clamp(0, 1)
            folder = root / split / f"class_{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            array = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(array).save(folder / f"{i:06d}.jpg", quality=85)
    marker.write_text(wanted)
    return root
