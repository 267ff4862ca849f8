"""Section ``loader``: the stage-one input pipeline, images/s delivered to the device.

Three loaders over the same uint8 32 px training images, all with random crop (padding 4),
horizontal flip and normalization, batch ``--hs-batch``, drop_last:

* ``device``: ``build_data(..., loader="device")``, the images kept on the device and augmented
  there in batches (``repopt.data.tensor_batches``);
* ``torchvision``: the standard CIFAR pipeline, a ``torch.utils.data.DataLoader`` with ``--workers``
  worker processes applying ``RandomCrop(32, padding=4) + RandomHorizontalFlip + Normalize`` per
  sample, then ``.to(device)``;
* ``repopt_dataloader``: ``build_data(..., loader="dataloader")``, the project's own worker path
  (per-sample crop/flip seeded per (epoch, batch, position) for exact resume, normalization on the
  device).

Each is run for one untimed epoch (worker start-up, first touches), then ``--loader-epochs``
timed epochs, ending with a device synchronization.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .data import DataSources, parse_data
from .settings import Settings
from .timing import Stopwatch, free_memory

log = logging.getLogger("repopt.benchmark")


class _UInt8Images(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i])


def torchvision_loader(images: torch.Tensor, labels: torch.Tensor, mean, std, batch: int, workers: int, pin: bool) -> DataLoader:
    transform = v2.Compose(
        [
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
    return DataLoader(
        _UInt8Images(images, labels, transform),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def _drain(batches, device) -> int:
    """Iterate one epoch of (x, y) batches, making sure each lands on ``device``; returns the image count."""
    n = 0
    for x, y in batches:
        if x.device != device:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
        n += int(y.shape[0])
    return n


def _measure(label: str, key: str, epoch_fn, settings: Settings, **extra) -> dict:
    device = settings.device
    _drain(epoch_fn(0), device)  # warm-up epoch: worker start-up, first allocations
    images = 0
    with Stopwatch(device) as sw:
        for e in range(1, settings.loader_epochs + 1):
            images += _drain(epoch_fn(e), device)
    row = {
        "key": key,
        "label": label,
        "unit": "img/s",
        "value": images / sw.seconds,
        "seconds": sw.seconds,
        "images": images,
        **extra,
    }
    log.info("loader: %-40s %10.0f img/s (%d images, %.2f s)", label, row["value"], images, sw.seconds)
    return row


def run(settings: Settings, sources: DataSources) -> dict:
    device, workers = settings.device, settings.workers
    bundle = sources.bundle()
    rows = {}
    rows["device"] = _measure("device loader (repopt, loader=device)", "device", bundle.train.epoch, settings, workers=0)

    images = bundle.train.images.cpu()
    labels = bundle.train.labels.cpu()
    tv = torchvision_loader(images, labels, bundle.mean, bundle.std, settings.hs_batch, workers, device.type == "cuda")
    rows["torchvision"] = _measure(
        f"torchvision DataLoader ({workers} workers)",
        "torchvision",
        lambda e: iter(tv),  # noqa: F821 (bound above; deleted only after the rounds)
        settings,
        workers=workers,
    )
    del tv
    free_memory(device)

    dl_bundle = sources.build("dataloader", workers)
    rows["repopt_dataloader"] = _measure(
        f"repopt loader=dataloader ({workers} workers)", "repopt_dataloader", dl_bundle.train.epoch, settings, workers=workers
    )
    del dl_bundle
    free_memory(device)

    dev, tvv = rows["device"]["value"], rows["torchvision"]["value"]
    return {
        "title": "stage-one input pipeline (32 px, crop+flip+normalize)",
        "settings": {
            "data": settings.data,
            "images": int(bundle.train.num_samples),
            "batch": settings.hs_batch,
            "workers": workers,
            "timed_epochs": settings.loader_epochs,
        },
        "rows": list(rows.values()),
        "ratios": {
            "device_over_dataloader": dev / tvv if tvv else None,
            "device_over_repopt_dataloader": dev / rows["repopt_dataloader"]["value"],
        },
        "notes": [
            "with an image folder, loader=dataloader decodes the JPEG files in its workers (PIL) while the other "
            "two start from the decoded uint8 images"
        ]
        if parse_data(settings.data)[0] == "cifar10-jpeg"
        else [],
    }
