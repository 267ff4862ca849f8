"""Write small fake data sets in the real on-disk formats (CIFAR pickles, FashionMNIST idx, image folders).

The images are learnable: every class has its own colour, plus a little noise. Each writer returns
what it wrote (uint8 HWC / NCHW arrays, labels, class names) so tests can compare pixels exactly.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING), as the original CIFAR pickles were written.

    Loaded with ``encoding="latin1"`` (as torchvision does) they come back as ``str``; loaded with
    ``encoding="bytes"`` (as the CIFAR web page shows) as ``bytes`` - just like the real files.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump_py2(obj, path: Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def class_colors(num_classes: int, seed: int = 0) -> np.ndarray:
    """A distinct RGB colour per class (uint8, (num_classes, 3))."""
    rng = np.random.default_rng(seed + 10_000)
    return rng.integers(30, 226, size=(num_classes, 3)).astype(np.uint8)


def _images(labels: np.ndarray, colors: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, H, W, 3): the class colour plus uniform noise of +-25."""
    h, w = size
    base = colors[labels].astype(np.int16)[:, None, None, :]
    noise = rng.integers(-25, 26, size=(len(labels), h, w, 3), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _split_arrays(n: int, num_classes: int, colors: np.ndarray, rng: np.random.Generator):
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    hwc = _images(labels, colors, (32, 32), rng)
    return hwc, labels


def _flat(hwc: np.ndarray) -> np.ndarray:
    """CIFAR's row layout: (N, 3072) with all red, then green, then blue values."""
    return np.ascontiguousarray(hwc.transpose(0, 3, 1, 2).reshape(len(hwc), 3072))


def _pack(root: Path, folder: str, archive: str) -> None:
    import shutil

    with tarfile.open(root / archive, "w:gz") as tar:
        tar.add(root / folder, arcname=folder)
    shutil.rmtree(root / folder)


def write_fake_cifar100(
    root, n_train: int = 200, n_test: int = 100, num_classes: int = 100, seed: int = 0, as_archive: bool = False
) -> dict:
    """``root/cifar-100-python/{train,test,meta}`` (or ``root/cifar-100-python.tar.gz`` when ``as_archive``)."""
    root = Path(root)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = class_colors(num_classes, seed)
    names = [f"fine{i:03d}" for i in range(num_classes)]
    out = {"class_names": names}
    for split, n in (("train", n_train), ("test", n_test)):
        hwc, labels = _split_arrays(n, num_classes, colors, rng)
        _dump_py2(
            {
                b"filenames": [f"img_{split}_{i:05d}.png".encode() for i in range(n)],
                b"batch_label": f"{split}ing batch 1 of 1".encode(),
                b"fine_labels": [int(v) for v in labels],
                b"coarse_labels": [int(v) // 5 for v in labels],
                b"data": _flat(hwc),
            },
            folder / split,
        )
        out[f"{split}_data"], out[f"{split}_labels"] = hwc, labels
    _dump_py2(
        {
            b"fine_label_names": [n.encode() for n in names],
            b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(max(1, num_classes // 5))],
        },
        folder / "meta",
    )
    if as_archive:
        _pack(root, "cifar-100-python", "cifar-100-python.tar.gz")
    return out


def write_fake_cifar10(
    root, n_train: int = 100, n_test: int = 50, num_classes: int = 10, seed: int = 0, as_archive: bool = False
) -> dict:
    """``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` (or the .tar.gz)."""
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = class_colors(num_classes, seed)
    names = [f"class{i}" for i in range(num_classes)]
    out = {"class_names": names}
    train, train_labels = _split_arrays(n_train, num_classes, colors, rng)
    test, test_labels = _split_arrays(n_test, num_classes, colors, rng)
    bounds = np.linspace(0, n_train, 6).astype(int)
    for k in range(5):
        lo, hi = bounds[k], bounds[k + 1]
        _write_cifar10_batch(folder / f"data_batch_{k + 1}", f"training batch {k + 1} of 5", train[lo:hi], train_labels[lo:hi])
    _write_cifar10_batch(folder / "test_batch", "testing batch 1 of 1", test, test_labels)
    _dump_py2(
        {b"num_cases_per_batch": int(bounds[1] - bounds[0]), b"label_names": [n.encode() for n in names], b"num_vis": 3072},
        folder / "batches.meta",
    )
    out.update(train_data=train, train_labels=train_labels, test_data=test, test_labels=test_labels)
    if as_archive:
        _pack(root, "cifar-10-batches-py", "cifar-10-python.tar.gz")
    return out


def _write_cifar10_batch(path: Path, label: str, hwc: np.ndarray, labels: np.ndarray) -> None:
    _dump_py2(
        {
            b"batch_label": label.encode(),
            b"labels": [int(v) for v in labels],
            b"data": _flat(hwc),
            b"filenames": [f"{path.name}_{i:05d}.png".encode() for i in range(len(labels))],
        },
        path,
    )


def write_fake_fashionmnist(root, n_train: int = 60, n_test: int = 20, seed: int = 0, gzipped: bool = False) -> dict:
    """``root/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (``.gz`` when ``gzipped``)."""
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    levels = np.linspace(20, 235, 10).astype(np.int16)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        noise = rng.integers(-15, 16, size=(n, 28, 28), dtype=np.int16)
        images = np.clip(levels[labels][:, None, None] + noise, 0, 255).astype(np.uint8)
        files = {
            f"{prefix}-images-idx3-ubyte": struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes(),
            f"{prefix}-labels-idx1-ubyte": struct.pack(">ii", 2049, n) + labels.tobytes(),
        }
        for name, payload in files.items():
            if gzipped:
                with gzip.open(raw / f"{name}.gz", "wb") as f:
                    f.write(payload)
            else:
                (raw / name).write_bytes(payload)
        out["train" if prefix == "train" else "test"] = (images, labels.astype(np.int64))
    return out


def write_fake_imagefolder(
    root,
    classes: Sequence[str],
    n_per_class: int,
    size: int | tuple[int, int],
    split_names: Sequence[str] = ("train", "test"),
    fmt: str = "png",
    seed: int = 0,
) -> dict:
    """``root/<split>/<class>/NNNN.<fmt>`` images (PNG is lossless, so pixels round-trip exactly).

    Returns ``{split: (uint8 NCHW array in ImageFolder order, int64 labels)}``.
    """
    from PIL import Image

    root = Path(root)
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    colors = class_colors(len(classes), seed)
    out = {}
    for split in split_names:
        arrays, labels = [], []
        for label, cls in enumerate(sorted(classes)):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            imgs = _images(np.full(n_per_class, label), colors, (h, w), rng)
            for i, img in enumerate(imgs):
                path = d / f"{i:04d}.{fmt}"
                if fmt in ("jpg", "jpeg"):
                    Image.fromarray(img).save(path, quality=95)
                else:
                    Image.fromarray(img).save(path)
            arrays.append(imgs.transpose(0, 3, 1, 2))
            labels += [label] * n_per_class
        out[split] = (np.concatenate(arrays), np.asarray(labels, dtype=np.int64))
    return out
