"""Stage one's training (the app: ``hypersearch/app.py``): the HS model trained on the data set, its
scales exported with their provenance when the run completes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from repopt.engine import Callback
from repopt.optim import build_plain, optimizer_kwargs
from repopt.results import StageMetrics
from repopt.rundir import without_allowed
from repopt.scales import SCALES_FILENAME
from repopt.setup import make_trainer, place, run_records, scaled_lr, start
from repopt.tracking import tracked

from .config import HSConfig
from .export import abs_scales_by_stage, export_scales
from .model import build_hs_model, extract_scales

log = logging.getLogger("hypersearch")
SCALES_ARTIFACTS = (SCALES_FILENAME, "scales.csv")  # what a completed stage one promises besides the trainer's files


def set_constant_init(model, value: float = 1.0) -> None:
    """The ``scale_init=constant`` ablation: every scale starts at ``value``."""
    with torch.no_grad():
        for param in model.scale_parameters().values():
            param.fill_(value)


def tracked_scales(model) -> dict[str, torch.Tensor]:
    """What the tracker records of the scales at each epoch: every |s| of each stage."""
    return abs_scales_by_stage(extract_scales(model))


@tracked("hypersearch", ("metrics.json", "history.csv", "scales.safetensors"), scales_of=tracked_scales)
def train_hypersearch(cfg: HSConfig, run_dir: Path, callbacks: Sequence[Callback] = ()) -> StageMetrics:
    arch = cfg.arch.spec()
    runtime, data = start(cfg)
    model = build_hs_model(arch, data.num_classes, mode=cfg.mode, fused_forward=cfg.fused_forward)
    if cfg.scale_init == "constant":
        set_constant_init(model)
    model = place(model, runtime)
    lr = scaled_lr(cfg)
    optimizer = build_plain(model, lr, **optimizer_kwargs(cfg.optim))
    extra, metrics_extra = run_records("hypersearch", arch, data, cfg.mode)
    trainer = make_trainer(
        cfg,
        runtime,
        data,
        model,
        optimizer,
        run_dir,
        lr,
        checkpoint_extra=extra,
        callbacks=callbacks,
        metrics_extra=metrics_extra,
    )
    log.info("run directory %s; %s, mode %s", run_dir, arch.name, cfg.mode)
    metrics = trainer.fit(finish=False)  # completed only once the scales are on disk
    if not runtime.is_main:
        return metrics
    scales = extract_scales(trainer.delivered_model())  # the EMA's scales with ema.enabled and ema.evaluate
    top1, top5 = (metrics.ema_top1, metrics.ema_top5) if trainer.delivers_ema else (metrics.top1, metrics.top5)
    metadata = {
        "arch": arch.to_dict(),
        "dataset": data.name,
        "num_classes": data.num_classes,
        "hs_top1": top1,
        "hs_top5": top5,
        "epochs": metrics.epochs,
        "mode": cfg.mode,
        "scale_init": cfg.scale_init,
        "seed": cfg.seed,
        "config": without_allowed(trainer.checkpoint_extra["config"]),
    }
    written = export_scales(run_dir, scales, metadata)
    log.info("scales written to %s (HS top-1 %.2f)", written.path, metrics.top1)
    return trainer.complete(SCALES_ARTIFACTS, scales_file=str(written.path), scales_sha256=written.sha256)
