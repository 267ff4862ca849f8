"""ImageFolder trees: find the splits, check the classes, decode small images once (cached)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..config import DataConfig
from ..errors import DataError
from . import cache
from .decode import decode_files
from .types import TensorSplits

log = logging.getLogger(__name__)


@dataclass
class FolderSplit:
    """One split of the tree: its folder, its class names and its files in ImageFolder order."""

    name: str
    path: Path
    classes: list[str]
    files: list[str]
    labels: list[int]


def data_root(cfg: DataConfig) -> Path:
    """``data.root`` with ``~`` expanded, as an absolute path."""
    return Path(os.path.expanduser(cfg.root)).absolute()


def find_splits(cfg: DataConfig) -> tuple[Path, Path, Path]:
    """``(root, train_dir, test_dir)``: ``train/`` plus ``val/`` when present, else ``test/``."""
    root = data_root(cfg)
    if not root.is_dir():
        raise DataError(
            f"data.root {root} does not exist (data=imagefolder); point data.root at a folder with "
            f"train/<class>/* and val/<class>/* (or test/<class>/*)"
        )
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"no train folder in {root}: expected {train}/<class>/<image> (and val/ or test/ beside it)")
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root, train, root / name
    raise DataError(
        f"no evaluation folder in {root}: expected {root / 'val'} or {root / 'test'} with the same <class> folders as {train}"
    )


def scan_split(path: Path, allow_empty_classes: bool) -> FolderSplit:
    """Class folders (sorted) and image files (sorted walk), exactly as torchvision's ImageFolder orders them."""
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not classes:
        raise DataError(f"{path} has no class folders: expected {path}/<class>/<image>")
    files: list[str] = []
    labels: list[int] = []
    empty = []
    for label, cls in enumerate(classes):
        n = len(files)
        for dirpath, _, names in sorted(os.walk(path / cls, followlinks=True)):
            for fname in sorted(names):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.join(dirpath, fname))
                    labels.append(label)
        if len(files) == n:
            empty.append(cls)
    if not files:
        raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {path}; put files in {path}/<class>/")
    if empty and not allow_empty_classes:
        raise DataError(f"class folders without images in {path}: {_names(empty)}; add images or remove the folders")
    if empty:
        log.warning("class folders without images in %s: %s", path, _names(empty))
    return FolderSplit(path.name, path, classes, files, labels)


def scan(cfg: DataConfig) -> tuple[Path, FolderSplit, FolderSplit]:
    root, train_dir, test_dir = find_splits(cfg)
    train = scan_split(train_dir, allow_empty_classes=False)
    test = scan_split(test_dir, allow_empty_classes=True)
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise DataError(
            f"the class folders of {train_dir} and {test_dir} differ (only in {train.name}: {_names(only_train)}; "
            f"only in {test.name}: {_names(only_test)}); both splits need the same <class> folders"
        )
    return root, train, test


def _names(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def decode_split(cfg: DataConfig, root: Path, split: FolderSplit) -> torch.Tensor:
    """The split's images as uint8 NCHW at cfg.image_size, from the cache or decoded (and cached) now."""
    size = cfg.image_size
    dirs = cache.cache_dirs(cfg)
    name = cache.cache_name(root, split.name, size, split.files, split.labels)
    payload = cache.load(name, dirs)
    if payload is not None:
        images = payload.get("images")
        if (
            isinstance(images, torch.Tensor)
            and images.dtype == torch.uint8
            and tuple(images.shape) == (len(split.files), 3, size, size)
            and payload.get("class_names") == split.classes
            and torch.equal(payload.get("labels"), torch.as_tensor(split.labels, dtype=torch.int64))
        ):
            log.info("loaded decoded images from %s", payload["path"])
            return images
        log.warning("cache %s does not match the folder; decoding again", payload["path"])
    log.info("decoding %d images of %s at %dpx (once; cached afterwards)", len(split.files), split.path, size)
    images = decode_files(split.files, size, cfg.num_workers, desc=f"decoding {split.name}")
    cache.save(
        name,
        {
            "images": images,
            "labels": torch.as_tensor(split.labels, dtype=torch.int64),
            "class_names": split.classes,
            "root": str(root),
            "split": split.name,
            "image_size": size,
        },
        dirs,
    )
    return images


def load_small(cfg: DataConfig) -> TensorSplits:
    """A small-image tree decoded into memory (normalization measured from the training images)."""
    root, train, test = scan(cfg)
    return TensorSplits(
        train_images=decode_split(cfg, root, train),
        train_labels=torch.as_tensor(train.labels, dtype=torch.int64),
        test_images=decode_split(cfg, root, test),
        test_labels=torch.as_tensor(test.labels, dtype=torch.int64),
        class_names=train.classes,
        stats=None,
    )
