"""The worker-DataLoader path (large images), with the same resumable, sharded Batches contract."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .augment import normalizer, to_float
from .seeding import AUGMENT_STREAM, batch_shards, check_start, epoch_permutation, mix_seed, num_batches

_MASK63 = (1 << 63) - 1


class SeededDataset(Dataset):
    """``base[i]`` with ``transform`` applied under the seed that comes with the index.

    Keys are ``(index, seed)``: the transform runs with torch's global CPU generator seeded to
    ``seed`` (then restored), so the augmentation of a sample depends only on (run seed, epoch,
    batch index, position), not on which worker ran it or where the epoch started. Only the CPU
    generator is seeded (the transforms draw from it): ``torch.manual_seed`` would also reach every
    accelerator's generators, at ~100x the cost, once per sample.
    """

    def __init__(self, base: Any, transform: Optional[Callable] = None):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, Optional[int]]):
        index, seed = key
        img, label = self.base[index]
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            elif torch.utils.data.get_worker_info() is not None:
                torch.default_generator.manual_seed(seed)  # a worker's generator serves nothing else
                img = self.transform(img)
            else:
                state = torch.default_generator.get_state()
                torch.default_generator.manual_seed(seed)
                try:
                    img = self.transform(img)
                finally:
                    torch.default_generator.set_state(state)
        return img, label


class TensorImages(Dataset):
    """Samples ``(uint8 CHW tensor, label)`` of in-memory uint8 NCHW images (for loader=dataloader)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class EpochBatchSampler:
    """Index batches of one epoch from a start batch: this rank's slice of each global batch."""

    def __init__(
        self, n: int, batch_size: int, *, drop_last: bool, shuffle: bool, seeded: bool, seed: int, rank: int, world_size: int
    ):
        self.n, self.batch_size, self.drop_last, self.shuffle, self.seeded = n, batch_size, drop_last, shuffle, seeded
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches: list[list[tuple[int, Optional[int]]]] = []

    def total(self) -> int:
        return num_batches(self.n, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int, start: int) -> None:
        perm = epoch_permutation(self.n, self.seed, epoch, self.shuffle).tolist()
        self.batches = []
        for b, lo, r0, r1 in batch_shards(self.n, self.batch_size, start, self.total(), self.rank, self.world_size):
            base = mix_seed(self.seed, epoch, AUGMENT_STREAM, b) if self.seeded else None
            self.batches.append([(perm[lo + j], None if base is None else (base + j) & _MASK63) for j in range(r0, r1)])

    def __iter__(self):
        return iter([b for b in self.batches if b])

    def __len__(self) -> int:
        return sum(1 for b in self.batches if b)


class LoaderBatches:
    """Batches from a map-style dataset of ``(uint8 CHW image, label)`` through a worker DataLoader.

    The sample order is the permutation fixed by (seed, epoch); ``start`` drops the first batches
    from the index list; with several ranks each global batch is cut into contiguous slices. The
    uint8 batch goes to the device and is normalized there.
    """

    def __init__(
        self,
        base: Any,
        transform: Optional[Callable],
        device: torch.device,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        drop_last: bool,
        num_workers: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.device = torch.device(device)
        self.num_samples = len(base)
        self.sampler = EpochBatchSampler(
            self.num_samples,
            batch_size,
            drop_last=drop_last and train,
            shuffle=train,
            seeded=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        workers = max(int(num_workers), 0)
        self.loader = DataLoader(
            SeededDataset(base, transform),
            batch_sampler=self.sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )
        self.scale, self.bias = normalizer(mean, std, self.device)

    def __len__(self) -> int:
        return self.sampler.total()

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        check_start(start, len(self))
        self.sampler.set_epoch(epoch, start)
        return self._iterate()

    def _iterate(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = list(self.sampler.batches)
        it = iter(self.loader) if any(batches) else iter(())
        shape = None
        for keys in batches:
            if keys:
                x, y = next(it)
                shape = x.shape[1:]
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, torch.int64, non_blocking=True)
            else:  # this rank's slice of a short last batch is empty
                x = torch.empty(0, *(shape or (3, 1, 1)), dtype=torch.uint8, device=self.device)
                y = torch.empty(0, dtype=torch.int64, device=self.device)
            yield to_float(x, self.scale, self.bias), y


def randaugment(cfg) -> Optional[Callable]:
    """torchvision's ``v2.RandAugment`` of a DataConfig (``randaugment_magnitude``, ``randaugment_num_ops``), or None.

    One call distorts one image: ``num_ops`` ops, each drawn uniformly from torchvision's 14
    (Identity, ShearX/Y, TranslateX/Y, Rotate, Brightness, Color, Contrast, Sharpness, Posterize,
    Solarize, AutoContrast, Equalize) with a random sign, all at the fixed bin ``magnitude`` of 31
    (0-30), fill 0, nearest interpolation. It draws from torch's global generator, which
    ``SeededDataset`` seeds per sample, so it replays exactly on resume. conf/recipe/target_imagenet.yaml
    says how it differs from the official policy.
    """
    if cfg.randaugment_magnitude is None:
        return None
    return v2.RandAugment(num_ops=cfg.randaugment_num_ops, magnitude=cfg.randaugment_magnitude)


def small_transforms(
    train: bool, stored: int, size: int, padding: int, hflip: bool, randaugment: Optional[Callable] = None
) -> Optional[Callable]:
    """CIFAR-style: random crop with zero padding and flip at the stored size (then ``randaugment``
    on the uint8 image, when given), then resize if needed."""
    ops: list = []
    if train and padding > 0:
        ops.append(v2.RandomCrop(stored, padding=padding))
    if train and hflip:
        ops.append(v2.RandomHorizontalFlip())
    if train and randaugment is not None:
        ops.append(randaugment)
    if stored != size:
        ops.append(v2.Resize(size, antialias=True))
    return v2.Compose(ops) if ops else None


def folder_transforms(
    train: bool,
    size: int,
    *,
    padding: int,
    hflip: bool,
    random_resized_crop: bool,
    randaugment: Optional[Callable] = None,
    eval_crop_fraction: Optional[float] = None,
) -> Callable:
    """ImageFolder files (PIL) to uint8 CHW tensors of ``size`` x ``size``.

    Train: RandomResizedCrop + flip when ``random_resized_crop``, else Resize + RandomCrop(padding)
    + flip; then ``randaugment`` (on the PIL image) when given. Eval: Resize(size /
    ``eval_crop_fraction``) + CenterCrop(size); by default the fraction is 0.875 for large images and
    1 for small ones (<= 64 px), where the 0.875 margin would cut off too much of the object.
    """
    ops: list = []
    if train and random_resized_crop:
        ops.append(v2.RandomResizedCrop(size, antialias=True))
    elif train:
        ops += [v2.Resize(size, antialias=True), v2.RandomCrop(size, padding=padding if padding > 0 else None)]
    else:
        fraction = eval_crop_fraction if eval_crop_fraction is not None else (1.0 if size <= 64 else 0.875)
        ops += [v2.Resize(int(size / fraction), antialias=True), v2.CenterCrop(size)]
    if train and hflip:
        ops.append(v2.RandomHorizontalFlip())
    if train and randaugment is not None:
        ops.append(randaugment)
    ops += [v2.PILToTensor()]
    return v2.Compose(ops)
