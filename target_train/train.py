"""Stage two's training (the app: ``target_train/app.py``): scales resolved, the target re-initialized
from them, masks and RepOptimizer built, trained, and the folded model written when the run completes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from repopt.engine import Callback, Trainer
from repopt.optim import optimizer_kwargs
from repopt.results import StageMetrics
from repopt.setup import make_trainer, place, run_records, scaled_lr, start
from repopt.tracking import tracked

from .config import TargetConfig
from .deploy import export_deployed
from .handler import reinitialize
from .model import build_baseline_model, build_target_model
from .optim import build_optimizer
from .scales_source import ScalesChoice, is_unused, resolve_scales

log = logging.getLogger("target_train")


@dataclass
class TargetRun:
    """Everything the app assembled, so tests can look inside before (or instead of) training."""

    trainer: Trainer
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scales: ScalesChoice


def build_target_run(cfg: TargetConfig, run_dir: Path, callbacks: Sequence[Callback] = ()) -> TargetRun:
    """Pre-flight checks, then model + re-init + masks + optimizer + trainer (resumed if asked)."""
    arch = cfg.arch.spec()
    if cfg.model != "target":  # the baseline: a plain optimizer, the scales are neither loaded nor validated
        if not is_unused(cfg.scales):
            log.warning("model=%s trains with a plain optimizer: scales=%s is not used", cfg.model, cfg.scales)
        choice = ScalesChoice("none", None)
    else:
        choice = resolve_scales(
            cfg.scales, arch, cfg.scales_transform, cfg.scales_from
        )  # before the data: a bad scales file fails fast
    if cfg.grad_clip and choice.scales is not None:
        log.warning("grad_clip=%s breaks the CSLA equivalence of the RepOptimizer", cfg.grad_clip)
    runtime, data = start(cfg)  # seeds the run (model init below draws from the seeded generator)
    if cfg.model == "target":
        model = build_target_model(arch, data.num_classes)
    else:
        model = build_baseline_model(arch, data.num_classes, cfg.model)
    if choice.scales is not None and cfg.reinit:  # reinit=false: the ablation "masks only"
        reinitialize(model, choice.scales, use_identity_scales=cfg.use_identity_scales)
    model = place(model, runtime)
    lr = scaled_lr(cfg)
    masks_from = choice.scales if cfg.masks else None  # masks=false: the ablation "re-init only", a plain optimizer
    optimizer = build_optimizer(model, lr=lr, scales=masks_from, **optimizer_kwargs(cfg.optim))
    extra, metrics_extra = run_records("target_train", arch, data, cfg.model)
    if choice.scales is not None:
        extra["scales"] = choice.scales  # provenance: the exact scales this run's masks were built from
    extra["scales_identity"] = choice.identity()  # a resume must use the same scales (by content, not path)
    metrics_extra.update(model=cfg.model, optimizer=type(optimizer).__name__, scales=choice.describe())
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
        write_best=True,
        metrics_extra=metrics_extra,
    )
    return TargetRun(trainer, model, optimizer, choice)


@tracked("target_train", ("metrics.json", "history.csv", "deploy.pt"))
def train_target(cfg: TargetConfig, run_dir: Path, callbacks: Sequence[Callback] = ()) -> StageMetrics:
    run = build_target_run(cfg, run_dir, callbacks)
    c = run.scales
    log.info(
        "run directory %s; %s with %s; scales: %s%s",
        run_dir,
        cfg.model,
        type(run.optimizer).__name__,
        c.kind,
        f" {c.file.path} (sha256 {c.file.sha256[:12]}...)" if c.file else "",
    )
    metrics = run.trainer.fit(finish=False)  # completed only once deploy.pt is on disk
    if run.trainer.runtime.is_main:
        deploy = {}
        if cfg.deploy:
            # the delivered weights: the EMA's averaged copy with ema.enabled and ema.evaluate, else the trained model
            deploy = export_deployed(run.trainer.delivered_model(), run_dir / "deploy.pt", cfg.data.image_size)
        metrics = run.trainer.complete(["deploy.pt"] if cfg.deploy else [], **deploy)
    log.info("target top-1 %.2f (best %.2f)", metrics.top1, metrics.best_top1)
    return metrics
