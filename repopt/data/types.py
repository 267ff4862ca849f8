"""The shapes every data source hands to the training loops: a bundle of two batch streams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Batches(Protocol):
    """A resumable, deterministic stream of ``(images, labels)`` batches already on the device.

    ``num_samples`` is the number of images in the split (global, before sharding across ranks);
    ``len()`` is the number of batches per epoch (the same on every rank). ``epoch(e, start)``
    yields float32 NCHW normalized images and int64 labels, beginning at batch index ``start``;
    the batches depend only on (seed, epoch, batch index), so resuming at ``start=k`` gives
    exactly the batches ``k, k+1, ...`` of ``epoch(e, 0)``.
    """

    num_samples: int

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]: ...


@dataclass
class DataBundle:
    """A data set ready for training: a shuffled, augmented train stream and a fixed test stream."""

    name: str
    num_classes: int
    class_names: list[str]
    train: Batches
    test: Batches
    mean: Optional[tuple[float, float, float]] = None  # per-channel normalization (0..1 pixel scale)
    std: Optional[tuple[float, float, float]] = None


@dataclass
class TensorSplits:
    """A small-image data set decoded into memory: uint8 NCHW images and int64 labels per split."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: list[str]
    stats: Optional[tuple[tuple[float, float, float], tuple[float, float, float]]] = None  # None: measure
