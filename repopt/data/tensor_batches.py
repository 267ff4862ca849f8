"""The device path: uint8 images kept on the device, batches indexed and augmented there."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from ..errors import DataError
from .augment import crop_flip, crop_params, normalizer, to_float
from .seeding import AUGMENT_STREAM, batch_shards, check_start, epoch_permutation, generator, num_batches


class TensorBatches:
    """Batches of a uint8 NCHW tensor held on ``device``.

    Train mode (``augment=True``) shuffles with a permutation fixed by (seed, epoch) and draws each
    global batch's crop offsets and flips from a generator fixed by (seed, epoch, batch index); each
    rank then keeps its contiguous slice of the global batch, so any world size sees the same
    images. Test mode keeps the stored order, does not augment and never drops the last batch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool,
        drop_last: bool,
        seed: int = 0,
        padding: int = 0,
        hflip: bool = False,
        out_size: Optional[int] = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"expected uint8 NCHW images, got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.num_samples = int(images.shape[0])
        self.batch_size = int(batch_size)
        self.augment = augment
        self.drop_last = drop_last and augment
        self.seed = int(seed)
        self.padding = int(padding) if augment else 0
        self.hflip = bool(hflip) and augment
        self.out_size = out_size
        self.rank, self.world_size = rank, world_size
        self.scale, self.bias = normalizer(mean, std, self.device)

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size, self.drop_last)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        total = len(self)
        check_start(start, total)
        return self._iterate(epoch, start, total)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """One asynchronous host-to-device copy (a pageable copy would stall the GPU queue every batch)."""
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _iterate(self, epoch: int, start: int, total: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = self._to_device(epoch_permutation(self.num_samples, self.seed, epoch, self.augment))
        augment = self.augment and (self.padding > 0 or self.hflip)
        if augment and start < total:  # the epoch's crop/flip draws, each batch from its own generator, copied once
            all_params = self._to_device(
                torch.cat(
                    [
                        crop_params(
                            min(self.batch_size, self.num_samples - b * self.batch_size),
                            self.padding,
                            self.hflip,
                            generator(self.seed, epoch, AUGMENT_STREAM, b),
                        )
                        for b in range(start, total)
                    ],
                    dim=1,
                )
            )
        for b, lo, r0, r1 in batch_shards(self.num_samples, self.batch_size, start, total, self.rank, self.world_size):
            idx = perm[lo + r0 : lo + r1]
            x = self.images.index_select(0, idx)
            if augment:
                offset = (b - start) * self.batch_size
                x = crop_flip(x, all_params[:, offset + r0 : offset + r1], self.padding)
            yield to_float(x, self.scale, self.bias, self.out_size), self.labels.index_select(0, idx)
