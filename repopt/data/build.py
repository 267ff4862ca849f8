"""``build_data``: pick the source and the loader path for a DataConfig and wire up both splits."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder

from ..config import DataConfig
from ..errors import ConfigError, DataError
from . import imagefolder
from .loader_batches import LoaderBatches, TensorImages, folder_transforms, randaugment, small_transforms
from .stats import IMAGENET_STATS, compute_stats
from .synthetic import load_synthetic
from .tensor_batches import TensorBatches
from .torchvision_sets import load_cifar, load_fashionmnist
from .types import DataBundle, TensorSplits

log = logging.getLogger(__name__)

NAMES = ("cifar100", "cifar10", "fashionmnist", "imagefolder", "synthetic")
LOADERS = ("auto", "device", "dataloader")
SMALL_MAX = 64  # image folders up to this size are decoded once and augmented on the device


def build_data(
    cfg: DataConfig,
    device: torch.device | str,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    train_transform_size: Optional[int] = None,
) -> DataBundle:
    """Load ``cfg.name`` and return its train and test batch streams on ``device``.

    ``train_transform_size`` sets the training crop size when it differs from ``cfg.image_size``
    (evaluation always uses ``cfg.image_size``). With ``world_size > 1`` every rank builds the same
    global batches and keeps its contiguous slice.
    """
    device = torch.device(device)
    _validate(cfg, rank, world_size, train_transform_size)
    train_size = train_transform_size or cfg.image_size
    if cfg.name == "imagefolder" and (cfg.image_size > SMALL_MAX or cfg.loader == "dataloader"):
        if cfg.loader == "device":
            raise DataError(
                f"data.loader=device keeps every image in device memory and is meant for small images "
                f"(<= {SMALL_MAX} px); data.image_size={cfg.image_size} needs the worker DataLoader: use data.loader=auto"
            )
        return _folder_loader(cfg, device, seed, rank, world_size, train_size)

    splits = _load_tensors(cfg)
    stats = _given_stats(cfg) or splits.stats or compute_stats(splits.train_images)
    ordered_by_class = cfg.name == "imagefolder"
    splits = _subset(splits, cfg, ordered_by_class)
    n_train = int(splits.train_images.shape[0])
    _check_batch(cfg, n_train)
    mean, std = stats
    stored = int(splits.train_images.shape[-1])
    common = dict(mean=mean, std=std, seed=seed, rank=rank, world_size=world_size)
    if cfg.loader == "dataloader":
        train, test = _loader_pair(
            cfg,
            device,
            TensorImages(splits.train_images, splits.train_labels),
            small_transforms(True, stored, train_size, cfg.crop_padding, cfg.hflip, randaugment=randaugment(cfg)),
            TensorImages(splits.test_images, splits.test_labels),
            small_transforms(False, stored, cfg.image_size, 0, False),
            **common,
        )
    else:
        train = TensorBatches(
            splits.train_images,
            splits.train_labels,
            device,
            batch_size=cfg.batch_size,
            augment=True,
            drop_last=cfg.drop_last,
            padding=cfg.crop_padding,
            hflip=cfg.hflip,
            out_size=train_size,
            **common,
        )
        test = TensorBatches(
            splits.test_images,
            splits.test_labels,
            device,
            batch_size=cfg.eval_batch_size,
            augment=False,
            drop_last=False,
            out_size=cfg.image_size,
            **common,
        )
    return DataBundle(
        name=cfg.name,
        num_classes=len(splits.class_names),
        class_names=list(splits.class_names),
        train=train,
        test=test,
        mean=tuple(mean),
        std=tuple(std),
    )


def _loader_pair(
    cfg: DataConfig,
    device: torch.device,
    train_base,
    train_transform,
    test_base,
    test_transform,
    *,
    mean,
    std,
    seed: int,
    rank: int,
    world_size: int,
) -> tuple[LoaderBatches, LoaderBatches]:
    """The worker-DataLoader train stream (shuffled, augmented, global batch) and test stream (eval batch)."""
    common = dict(mean=mean, std=std, seed=seed, rank=rank, world_size=world_size)
    train = LoaderBatches(
        train_base,
        train_transform,
        device,
        batch_size=cfg.batch_size,
        train=True,
        drop_last=cfg.drop_last,
        num_workers=cfg.num_workers,
        **common,
    )
    test = LoaderBatches(
        test_base,
        test_transform,
        device,
        batch_size=cfg.eval_batch_size,
        train=False,
        drop_last=False,
        num_workers=cfg.num_workers,
        **common,
    )
    return train, test


def uses_device_loader(cfg: DataConfig) -> bool:
    """Whether ``cfg`` trains from the device loader (uint8 images kept on the device, whole-batch augmentation)."""
    if cfg.loader == "dataloader":
        return False
    return not (cfg.name == "imagefolder" and cfg.image_size > SMALL_MAX)


def _given_stats(cfg: DataConfig):
    """``data.mean`` / ``data.std`` when the config sets them, else None (the source's own)."""
    if cfg.mean is None or cfg.std is None:
        return None
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def _validate(cfg: DataConfig, rank: int, world_size: int, train_transform_size: Optional[int]) -> None:
    if cfg.name not in NAMES:
        raise DataError(f"unknown data set data.name={cfg.name!r}; choose one of: {', '.join(NAMES)}")
    if cfg.loader not in LOADERS:
        raise DataError(f"unknown data.loader={cfg.loader!r}; choose one of: {', '.join(LOADERS)}")
    if cfg.randaugment_magnitude is not None and uses_device_loader(cfg):
        # torchvision's RandAugment draws one op and one sign per call: on a batch tensor every image
        # would get the same distortion, which is not RandAugment. It runs per sample in the workers.
        raise ConfigError(
            f"data.randaugment_magnitude={cfg.randaugment_magnitude} augments each image on its own, in the worker "
            f"DataLoader, but data={cfg.name} at {cfg.image_size} px with data.loader={cfg.loader} uses the device "
            f"loader (whole batches at once); set data.loader=dataloader, or data.randaugment_magnitude=null"
        )
    if cfg.image_size < 1:
        raise DataError(f"data.image_size must be positive (got {cfg.image_size})")
    if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        raise DataError(
            f"data.batch_size and data.eval_batch_size must be positive (got {cfg.batch_size}, {cfg.eval_batch_size})"
        )
    if cfg.crop_padding < 0:
        raise DataError(f"data.crop_padding must be >= 0 (got {cfg.crop_padding})")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
    if cfg.batch_size % world_size:
        raise DataError(
            f"data.batch_size={cfg.batch_size} (the global batch) does not divide by the world size {world_size}; "
            f"choose a multiple of {world_size}"
        )
    if train_transform_size is not None and train_transform_size < 1:
        raise DataError(f"train_transform_size must be positive (got {train_transform_size})")
    for key in ("train_subset", "test_subset"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise DataError(f"data.{key} must be a positive number of images or null (got {value})")


def _check_batch(cfg: DataConfig, n_train: int) -> None:
    if cfg.drop_last and cfg.batch_size > n_train:
        raise DataError(
            f"data.batch_size={cfg.batch_size} is larger than the training set ({n_train} images) and "
            f"data.drop_last=true would leave no batch at all; lower data.batch_size or set data.drop_last=false"
        )


def _load_tensors(cfg: DataConfig) -> TensorSplits:
    if cfg.name in ("cifar100", "cifar10"):
        return load_cifar(cfg.name, cfg)
    if cfg.name == "fashionmnist":
        return load_fashionmnist(cfg)
    if cfg.name == "synthetic":
        return load_synthetic(cfg)
    return imagefolder.load_small(cfg)


def subset_indices(labels: torch.Tensor, n: Optional[int], ordered_by_class: bool) -> Optional[torch.Tensor]:
    """The indices kept by a subset of ``n`` images, or None to keep everything.

    Sources stored in random order keep their first ``n`` images. Folder trees are stored class by
    class, where the first ``n`` would be one or two classes only; they keep the first ``n`` of a
    round-robin over the classes (file order within a class), then their stored order.
    """
    total = int(labels.shape[0])
    if n is None or n >= total:
        return None
    if not ordered_by_class:
        return torch.arange(n)
    # rank of each image within its class: images with rank 0 of every class come first
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    within = torch.empty_like(order)
    within[order] = torch.arange(total) - starts
    keep = torch.argsort(within * (int(labels.max()) + 1) + labels, stable=True)[:n]
    return keep.sort().values


def _subset(splits: TensorSplits, cfg: DataConfig, ordered_by_class: bool) -> TensorSplits:
    tr = subset_indices(splits.train_labels, cfg.train_subset, ordered_by_class)
    te = subset_indices(splits.test_labels, cfg.test_subset, ordered_by_class)
    if tr is not None:
        splits.train_images, splits.train_labels = splits.train_images[tr], splits.train_labels[tr]
    if te is not None:
        splits.test_images, splits.test_labels = splits.test_images[te], splits.test_labels[te]
    return splits


class _ScannedImageFolder(ImageFolder):
    """torchvision's ImageFolder over a split already scanned (and checked) by ``imagefolder.scan``."""

    def __init__(self, split: imagefolder.FolderSplit):
        self._split = split
        super().__init__(str(split.path), allow_empty=True)

    def find_classes(self, directory):
        return list(self._split.classes), {c: i for i, c in enumerate(self._split.classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return list(zip(self._split.files, self._split.labels))


def _folder_loader(cfg: DataConfig, device: torch.device, seed: int, rank: int, world_size: int, train_size: int) -> DataBundle:
    _, train_split, test_split = imagefolder.scan(cfg)
    bases = []
    for split, n in ((train_split, cfg.train_subset), (test_split, cfg.test_subset)):
        ds = _ScannedImageFolder(split)
        keep = subset_indices(torch.as_tensor(split.labels), n, ordered_by_class=True)
        bases.append(ds if keep is None else Subset(ds, keep.tolist()))
    _check_batch(cfg, len(bases[0]))
    mean, std = _given_stats(cfg) or IMAGENET_STATS
    train, test = _loader_pair(
        cfg,
        device,
        bases[0],
        folder_transforms(
            True,
            train_size,
            padding=cfg.crop_padding,
            hflip=cfg.hflip,
            random_resized_crop=cfg.random_resized_crop,
            randaugment=randaugment(cfg),
        ),
        bases[1],
        folder_transforms(
            False, cfg.image_size, padding=0, hflip=False, random_resized_crop=False, eval_crop_fraction=cfg.eval_crop_fraction
        ),
        mean=mean,
        std=std,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    return DataBundle(
        name=cfg.name,
        num_classes=len(train_split.classes),
        class_names=list(train_split.classes),
        train=train,
        test=test,
        mean=mean,
        std=std,
    )
