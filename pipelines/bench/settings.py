"""What every benchmark section is told: the sections, the device and dtype, the sizes (``Settings``)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from repopt.engine.runtime import Runtime

log = logging.getLogger("pipelines.benchmark")

SECTIONS = ("opt", "train", "loader", "hs_epoch")


@dataclass
class Settings:
    """Every knob of one benchmark run, resolved for the device (see ``pipelines.benchmark``)."""

    device: torch.device
    sections: tuple[str, ...]
    opt_arch: str
    train_arch: str
    hs_arch: str
    resolution: int
    batch: int
    steps: int
    warmup: int
    num_classes: int
    hs_images: int
    hs_batch: int
    loader_epochs: int
    workers: int
    compile: bool
    compile_modes: tuple[str, ...]
    data: str
    data_cache: str
    amp: bool
    channels_last: bool
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["device"] = str(self.device)
        d["sections"] = list(self.sections)
        d["compile_modes"] = list(self.compile_modes)
        return d


def runtime(settings: Settings) -> Runtime:
    """The trainer's runtime for the benchmark's device, AMP and memory-format switches."""
    import torch  # here: the benchmark's arguments are checked before torch loads

    from repopt.engine.runtime import Runtime

    return Runtime(settings.device, torch.bfloat16 if settings.amp else None, settings.channels_last)


def place(model: torch.nn.Module, settings: Settings) -> torch.nn.Module:
    """``repopt.setup.place``: ``model`` on the run's device, channels_last when the run trains in it."""
    from repopt.setup import place as _place

    return _place(model, runtime(settings))
