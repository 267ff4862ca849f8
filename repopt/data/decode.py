"""Decode image files once into one uint8 NCHW tensor (batched JPEG decoding, optional workers)."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

try:  # torchvision's decoders are fast for many small files; PIL is the fallback where they are gone
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    from torchvision.io.image import _has_image_ops

    _TV_IO = _has_image_ops()
except ImportError:  # pragma: no cover - depends on the torchvision build
    _TV_IO = False

from ..errors import DataError

_JPEG = (".jpg", ".jpeg")
CHUNK = 512


def _read_bytes(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def _decode_pil(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return TF.pil_to_tensor(im.convert("RGB"))


def _fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` and center-crop a square (no-op when already size x size)."""
    if img.shape[-2:] == (size, size):
        return img
    img = TF.resize(img, size, antialias=True)
    return TF.center_crop(img, [size, size])


def decode_chunk(paths: Sequence[str], size: int) -> torch.Tensor:
    """Decode ``paths`` into a (len(paths), 3, size, size) uint8 tensor."""
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    done = set()
    with warnings.catch_warnings():
        # torchvision 0.29 marks its decoders deprecated (in favour of TorchCodec); they still work
        warnings.simplefilter("ignore", DeprecationWarning)
        jpeg = [i for i, p in enumerate(paths) if p.lower().endswith(_JPEG)] if _TV_IO else []
        if jpeg:
            try:
                imgs = decode_jpeg([_read_bytes(paths[i]) for i in jpeg], mode=ImageReadMode.RGB)
            except (RuntimeError, ValueError):
                imgs = None  # one bad or unusual file: decode one by one below to find it
            if imgs is not None:
                for i, img in zip(jpeg, imgs):
                    out[i] = _fit(img, size)
                    done.add(i)
        for i, p in enumerate(paths):
            if i in done:
                continue
            out[i] = _fit(_decode_one(p), size)
    return out


def _decode_one(path: str) -> torch.Tensor:
    try:
        if _TV_IO:
            try:
                return decode_image(_read_bytes(path), mode=ImageReadMode.RGB)
            except (RuntimeError, ValueError):
                pass  # formats or variants torchvision does not read: try PIL
        return _decode_pil(path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure names the file
        raise DataError(f"could not decode image {path}: {exc}; remove or replace the file") from None


class _Chunks(Dataset):
    def __init__(self, paths: Sequence[str], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return -(-len(self.paths) // CHUNK)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_chunk(self.paths[i * CHUNK : (i + 1) * CHUNK], self.size)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def decode_files(paths: Sequence[str], size: int, num_workers: int = 0, desc: str = "decoding") -> torch.Tensor:
    """All of ``paths`` as one (N, 3, size, size) uint8 tensor, in order, with a progress bar on a TTY."""
    from tqdm.auto import tqdm

    chunks = _Chunks(paths, size)
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    workers = min(max(int(num_workers), 0), _cpus() - 1, len(chunks) - 1)
    if workers >= 2:  # one worker only adds transfer cost over decoding here
        loader = DataLoader(chunks, batch_size=None, num_workers=workers, prefetch_factor=4, worker_init_fn=_one_thread)
        source = iter(loader)
    else:
        source = (chunks[i] for i in range(len(chunks)))
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not sys.stderr.isatty(), leave=False)
    with bar:
        for i, block in enumerate(source):
            out[i * CHUNK : i * CHUNK + block.shape[0]] = block
            bar.update(block.shape[0])
    return out
