"""CIFAR-10/100 and FashionMNIST read by torchvision's own parsers, with clear offline errors."""

from __future__ import annotations

import gzip
import http.client
import logging
import os
import pickle
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import datasets
from torchvision.datasets.utils import check_integrity, extract_archive

from ..config import DataConfig
from ..errors import DataError
from .imagefolder import data_root
from .stats import CIFAR10_STATS, CIFAR100_STATS, FASHIONMNIST_STATS
from .types import TensorSplits

log = logging.getLogger(__name__)

_NETWORK_ERRORS = (URLError, OSError, RuntimeError, http.client.HTTPException)
_READ_ERRORS = (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError, IndexError)


@dataclass(frozen=True)
class _Spec:
    title: str
    dataset: Any  # the torchvision class
    stats: Any


_SPECS = {
    "cifar100": _Spec("CIFAR-100", datasets.CIFAR100, CIFAR100_STATS),
    "cifar10": _Spec("CIFAR-10", datasets.CIFAR10, CIFAR10_STATS),
    "fashionmnist": _Spec("FashionMNIST", datasets.FashionMNIST, FASHIONMNIST_STATS),
}


def _alternatives(name: str) -> str:
    others = [f"data={n}" for n in ("cifar100", "cifar10", "fashionmnist") if n != name]
    return ", ".join(
        others
        + ["data=imagefolder data.root=/path/to/folder (train/<class>/*, val/<class>/* or test/<class>/*)", "data=synthetic"]
    )


def _unverified(cls: type) -> type:
    """A CIFAR subclass that accepts the files when they exist (no md5), parsed by torchvision's code."""

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        return all(os.path.isfile(os.path.join(folder, f)) for f, _ in self.train_list + self.test_list)

    meta = dict(cls.meta, md5=None)  # check_integrity(path, None) only checks that the file exists
    return type(f"Unverified{cls.__name__}", (cls,), {"_check_integrity": _check_integrity, "meta": meta})


def _extract(archive: Path, dest: Path) -> None:
    log.info("extracting %s into %s", archive, dest)
    try:
        extract_archive(str(archive), str(dest))
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile, RuntimeError) as exc:
        raise DataError(f"{archive} is incomplete or corrupt ({exc}); delete it and put a complete copy there") from None


# --------------------------------------------------------------------------------------------- CIFAR


def _cifar_files(cls: type, root: Path) -> list[tuple[Path, str]]:
    folder = root / cls.base_folder
    files = [(folder / f, md5) for f, md5 in cls.train_list + cls.test_list]
    return files + [(folder / cls.meta["filename"], cls.meta["md5"])]


def _cifar_state(cls: type, root: Path, verify: bool) -> str:
    """'ok', 'missing' or 'mismatch' (present but failing torchvision's checksums)."""
    files = _cifar_files(cls, root)
    if not all(p.is_file() for p, _ in files):
        return "missing"
    if verify and not all(check_integrity(str(p), md5) for p, md5 in files):
        return "mismatch"
    return "ok"


def load_cifar(name: str, cfg: DataConfig) -> TensorSplits:
    spec = _SPECS[name]
    base = spec.dataset
    # The checksums (when asked for) are checked here once; torchvision's parser then reads the
    # files without hashing them again for each split.
    cls = _unverified(base)
    root = data_root(cfg)
    folder, archive = root / base.base_folder, root / base.filename
    state = _cifar_state(base, root, cfg.verify_checksums)
    if state != "ok" and archive.is_file():
        if cfg.verify_checksums and not check_integrity(str(archive), base.tgz_md5):
            if not cfg.download:
                raise DataError(
                    f"{archive} does not match torchvision's checksum; replace it with the official file, "
                    f"or set data.verify_checksums=false to use it as it is"
                )
        else:
            _extract(archive, root)
            state = _cifar_state(base, root, cfg.verify_checksums)
    if state == "mismatch" and not cfg.download:
        raise DataError(
            f"the {spec.title} files in {folder} do not match torchvision's checksums; set "
            f"data.verify_checksums=false to use them as they are, or delete {folder} and download again"
        )
    if state != "ok":
        if not cfg.download:
            raise DataError(_missing_cifar(spec, root, "data.download=false"))
        try:
            root.mkdir(parents=True, exist_ok=True)
            (base if cfg.verify_checksums else cls)(str(root), train=True, download=True)
        except _NETWORK_ERRORS as exc:
            if state == "mismatch":
                raise DataError(
                    f"the {spec.title} files in {folder} do not match torchvision's checksums and a fresh copy "
                    f"could not be downloaded ({exc}); set data.verify_checksums=false to use them as they are, "
                    f"or put the official {base.filename} into the directory {root}/"
                ) from None
            raise DataError(_missing_cifar(spec, root, f"download failed: {exc}")) from None
        if _cifar_state(base, root, cfg.verify_checksums) != "ok":
            raise DataError(_missing_cifar(spec, root, "the download did not produce the expected files"))
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError as exc:
        raise DataError(
            f"torchvision could not use the {spec.title} files in {folder} ({exc}); set "
            f"data.verify_checksums=false if they are your own copies, or delete {folder} to download again"
        ) from None
    except _READ_ERRORS as exc:
        raise DataError(f"could not read the {spec.title} files in {folder}: {exc!r}") from None
    return TensorSplits(
        train_images=_hwc_to_nchw(train.data),
        train_labels=torch.as_tensor(train.targets, dtype=torch.int64),
        test_images=_hwc_to_nchw(test.data),
        test_labels=torch.as_tensor(test.targets, dtype=torch.int64),
        class_names=[str(c) for c in train.classes],
        stats=spec.stats,
    )


def _missing_cifar(spec: _Spec, root: Path, reason: str) -> str:
    return (
        f"{spec.title} is not in {root} ({reason}). Put {spec.dataset.filename} (from {spec.dataset.url}) "
        f"into the directory {root}/ (it is extracted automatically), or point data.root at the folder that "
        f"holds it, or choose another data set: {_alternatives(spec.dataset.__name__.lower())}"
    )


def _hwc_to_nchw(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).contiguous()


# -------------------------------------------------------------------------------------- FashionMNIST


def _fmnist_raw(root: Path) -> Path:
    return root / datasets.FashionMNIST.__name__ / "raw"


def load_fashionmnist(cfg: DataConfig) -> TensorSplits:
    spec = _SPECS["fashionmnist"]
    cls = datasets.FashionMNIST
    root = data_root(cfg)
    raw = _fmnist_raw(root)
    resources = [(raw / f, raw / f[: -len(".gz")], md5) for f, md5 in cls.resources]
    missing = [(gz, plain, md5) for gz, plain, md5 in resources if not plain.is_file()]
    for gz, plain, md5 in missing:  # archives placed by hand: unpack them
        if gz.is_file():
            if cfg.verify_checksums and not check_integrity(str(gz), md5):
                if cfg.download:
                    continue  # torchvision downloads a good copy below
                raise DataError(f"{gz} does not match torchvision's checksum; replace it or set data.verify_checksums=false")
            try:
                with gzip.open(gz, "rb") as src, open(plain, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as exc:
                plain.unlink(missing_ok=True)
                raise DataError(f"{gz} is incomplete or corrupt ({exc}); delete it and put a complete copy there") from None
    if not all(plain.is_file() for _, plain, _ in resources):
        names = ", ".join(gz.name for gz, _, _ in resources)
        if not cfg.download:
            raise DataError(_missing_fmnist(root, raw, names, "data.download=false"))
        try:
            root.mkdir(parents=True, exist_ok=True)
            cls(str(root), train=True, download=True)
        except _NETWORK_ERRORS as exc:
            raise DataError(_missing_fmnist(root, raw, names, f"download failed: {exc}")) from None
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except (RuntimeError, *_READ_ERRORS) as exc:
        raise DataError(f"could not read the FashionMNIST files in {raw}: {exc!r}") from None
    pad = 2 if cfg.image_size == 32 else 0
    return TensorSplits(
        train_images=_gray_to_rgb(train.data, pad),
        train_labels=train.targets.to(torch.int64),
        test_images=_gray_to_rgb(test.data, pad),
        test_labels=test.targets.to(torch.int64),
        class_names=list(cls.classes),
        stats=spec.stats,
    )


def _missing_fmnist(root: Path, raw: Path, names: str, reason: str) -> str:
    return (
        f"FashionMNIST is not in {raw} ({reason}). Put {names} into the directory {raw}/, or point "
        f"data.root at the folder that holds FashionMNIST/raw, or choose another data set: {_alternatives('fashionmnist')}"
    )


def _gray_to_rgb(data: torch.Tensor, pad: int) -> torch.Tensor:
    x = data.to(torch.uint8).unsqueeze(1)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    return x.expand(-1, 3, -1, -1).contiguous()
