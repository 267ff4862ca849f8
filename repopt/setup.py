"""Assembly steps both stage apps share: runtime, data, learning rate, scheduler, trainer."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .config import TrainConfig, to_plain
from .data import build_data
from .engine import Runtime, Trainer, build_scheduler, resolve_runtime
from .engine.sync_bn import sync_batch_norm
from .engine.trainer import steps_per_epoch
from .errors import ConfigError
from .family import family_of
from .host import seed_everything
from .scheduler import restarted_by_scheduler

log = logging.getLogger(__name__)


def scaled_lr(cfg: TrainConfig) -> float:
    """The paper's linear scaling rule: lr x batch / base_batch."""
    return cfg.optim.lr * cfg.data.batch_size / cfg.optim.base_batch_size


def start(cfg: TrainConfig):
    """Resolve the runtime and load the data (pre-flight: device and dataset checked here)."""
    runtime = resolve_runtime(cfg)
    seed_everything(cfg.seed)
    data = build_data(cfg.data, runtime.device, seed=cfg.seed, rank=runtime.rank, world_size=runtime.world_size)
    log.info(
        "data %s: %d train / %d test images, %d classes; device %s",
        data.name,
        data.train.num_samples,
        data.test.num_samples,
        data.num_classes,
        runtime.describe(),
    )
    return runtime, data


def place(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Move a model to the device in the memory format the runtime trains in; under DDP, make
    BN normalize over the global batch. Call before building the optimizer (BN is replaced)."""
    if runtime.distributed:
        model = sync_batch_norm(model, runtime.device)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def run_records(stage: str, arch, data, mode: str) -> tuple[dict, dict]:
    """What both stages record about a run: in ``last.pt`` (checked on resume) and in ``metrics.json``."""
    checkpoint = {
        "stage": stage,
        "arch": arch.to_dict(),
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "mode": mode,
    }
    metrics = {
        "stage": stage,
        "family": family_of(arch).name,
        "arch": arch.name,
        "arch_spec": arch.to_dict(),
        "depth": arch.depth,
        "dataset": data.name,
    }
    return checkpoint, metrics


def make_trainer(
    cfg: TrainConfig, runtime: Runtime, data, model: nn.Module, optimizer, run_dir: Path, base_lr: float, **kwargs
) -> Trainer:
    """Scheduler + trainer; with ``resume=true``, or in a job its scheduler started again (a requeued
    SLURM job, repopt/scheduler.py), the run continues from ``run_dir/last.pt``."""
    scheduler = build_scheduler(optimizer, cfg.sched, steps_per_epoch(cfg, data), cfg.epochs, base_lr)
    kwargs.setdefault("checkpoint_extra", {})
    kwargs["checkpoint_extra"].setdefault("config", to_plain(cfg))
    trainer = Trainer(model, optimizer, scheduler, data, cfg, runtime, run_dir, **kwargs)
    restarted = not cfg.resume and restarted_by_scheduler()
    if cfg.resume or restarted:
        if restarted:
            log.info(
                "restarted by the scheduler (SLURM_RESTART_COUNT=%s): continuing this run as with resume=true",
                os.environ.get("SLURM_RESTART_COUNT"),
            )
        if not trainer.restore():
            log.info("resume=true but %s has no last.pt yet: starting from scratch", run_dir)
    elif trainer.last_path.exists():
        raise ConfigError(
            f"{run_dir} already holds last.pt from an earlier run; pass resume=true to continue it, "
            f"or choose a new run directory (nothing was overwritten)"
        )
    return trainer
