"""The data a benchmark reads: the shared CIFAR-10 archive extracted once, or synthetic batches."""

from __future__ import annotations

import logging
import os
import tarfile
import time
from pathlib import Path
from typing import Optional

from .settings import Settings

log = logging.getLogger("pipelines.benchmark")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_CIFAR10_JPEG = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def parse_data(spec: str) -> tuple[str, Optional[Path]]:
    """``synthetic`` or ``cifar10-jpeg[:<path to the .tar.gz or its extracted folder>]``."""
    if spec == "synthetic":
        return "synthetic", None
    if spec == "cifar10-jpeg" or spec.startswith("cifar10-jpeg:"):
        path = spec.partition(":")[2] or str(DEFAULT_CIFAR10_JPEG)
        return "cifar10-jpeg", Path(os.path.expanduser(path))
    raise ValueError(f"--data {spec!r}: use 'synthetic' or 'cifar10-jpeg:<path to cifar10-jpeg.tar.gz or its folder>'")


def cifar10_root(path: Path, cache: Path) -> Path:
    """The folder holding ``train/`` and ``test/``: ``path`` itself, or ``path`` extracted into ``cache``."""
    if path.is_dir():
        if (path / "train").is_dir():
            return path
        raise FileNotFoundError(f"{path} has no train/ folder (expected the extracted cifar10-jpeg layout train/<class>/*.jpg)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass --data cifar10-jpeg:<path to cifar10-jpeg.tar.gz>")
    root = cache / "cifar10-jpeg"
    marker = root / ".extracted"
    if not marker.exists():
        log.info("extracting %s to %s (once)", path, root)
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path) as tar:
            try:
                tar.extractall(root, filter="data")
            except TypeError:  # Python without extraction filters
                tar.extractall(root)  # noqa: S202 - the shared, trusted archive
        inner = [p for p in root.iterdir() if p.is_dir() and (p / "train").is_dir()]
        if not (root / "train").is_dir() and len(inner) == 1:
            root = inner[0]
        marker.write_text(str(root))
    else:
        root = Path(marker.read_text().strip() or root)
    return root


class DataSources:
    """Builds (once) the CIFAR-sized training data the ``loader`` and ``hs_epoch`` sections share."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._device_bundle = None

    def config(self, loader: str = "device", workers: int = 0):
        from repopt.config import DataConfig

        s = self.settings
        kind, path = parse_data(s.data)
        common = dict(
            image_size=32,
            batch_size=s.hs_batch,
            eval_batch_size=512,
            loader=loader,
            num_workers=workers,
            crop_padding=4,
            hflip=True,
            drop_last=True,
        )
        if kind == "synthetic":
            return DataConfig(
                name="synthetic", synthetic_num_classes=10, synthetic_train_size=s.hs_images, synthetic_test_size=64, **common
            )
        root = cifar10_root(path, Path(os.path.expanduser(s.data_cache)))
        return DataConfig(
            name="imagefolder",
            root=str(root),
            train_subset=s.hs_images,
            test_subset=64,
            cache_dir=str(Path(os.path.expanduser(s.data_cache)) / "decoded"),
            **common,
        )

    def build(self, loader: str = "device", workers: int = 0):
        """``build_data`` for this run's data, built now (the caller owns it and its workers)."""
        from repopt.data import build_data

        cfg = self.config(loader, workers)
        if cfg.name == "imagefolder" and loader == "device":
            cfg.num_workers = max(self.settings.workers, 0)  # decode workers, once
        t0 = time.perf_counter()
        bundle = build_data(cfg, self.settings.device, seed=self.settings.seed)
        log.info("data %s (%s loader) ready in %.1f s", cfg.name, loader, time.perf_counter() - t0)
        return bundle

    def bundle(self):
        """The device-loader bundle, built once and shared by the sections."""
        if self._device_bundle is None:
            self._device_bundle = self.build("device")
        return self._device_bundle
