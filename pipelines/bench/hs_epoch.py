"""Section ``hs_epoch``: one end-to-end Hyper-Search training epoch on CIFAR-sized data.

The stage-one setting: the HS model (every scale learnable, fused forward, ImageNet strides on
32 px images), the device loader with crop+flip+normalize, drop_last, and the paper's SGD recipe
(lr 0.1 x batch/256, momentum 0.9, Nesterov, weight decay 4e-5 on the official groups; the
per-step schedule is left out, it costs nothing measurable). bf16 autocast and channels_last on
CUDA. Each variant starts from a fresh model: ``--warmup`` steps of epoch 0 (for compiled variants
at least 3, which includes compilation and CUDA-graph recording) are timed separately, then one
full epoch (epoch 1) is timed as the steady state.
"""

from __future__ import annotations

import logging
import math

import torch

from hypersearch.model import build_hs_model
from repopt.engine import TrainStep
from repopt.optim import StepOptions, build_plain
from repopt.vgg.arch import get_arch

from .data import DataSources
from .settings import Settings, place, runtime
from .timing import Stopwatch, free_memory

log = logging.getLogger("repopt.benchmark")

BASE_LR, WD, MOMENTUM = 0.1, 4e-5, 0.9
REFERENCE_IMAGES = 50_000  # one CIFAR training epoch


def _one_variant(label: str, mode, arch, bundle, lr: float, settings: Settings) -> dict:
    device = settings.device
    torch.manual_seed(settings.seed)
    model = place(build_hs_model(arch, bundle.num_classes, mode="hs", fused_forward=True), settings)
    model.train()
    optimizer = build_plain(
        model, lr, name="sgd", weight_decay=WD, options=StepOptions(momentum=MOMENTUM, nesterov=True)
    )  # as stage one builds it
    forward = model
    if mode is not None:
        forward = torch.compile(model, mode=None if mode == "default" else mode)

    train_step = TrainStep(forward, optimizer, runtime(settings))  # the trainer's step

    def step(x, y):
        return train_step(x, y)[0]

    steps_per_epoch = len(bundle.train)
    warmup = min(max(settings.warmup, 1 if mode is None else 3), steps_per_epoch)
    with Stopwatch(device) as first:
        for _, (x, y) in zip(range(warmup), bundle.train.epoch(0)):
            step(x, y)
    losses = []
    with Stopwatch(device) as epoch:
        for x, y in bundle.train.epoch(1):
            losses.append(step(x, y))
    images = steps_per_epoch * settings.hs_batch
    last_loss = float(losses[-1]) if losses else float("nan")
    row = {
        "key": label,
        "label": f"HS epoch, {label}",
        "unit": "s/epoch",
        "value": epoch.seconds,
        "images": images,
        "images_per_s": images / epoch.seconds,
        "s_per_50k": epoch.seconds * REFERENCE_IMAGES / images,
        "warmup_steps": warmup,
        "warmup_s": first.seconds,
        "compile_mode": mode,
        "last_loss": last_loss,
        "loss_finite": math.isfinite(last_loss),
    }
    log.info(
        "hs_epoch: %-40s %7.2f s/epoch  %9.0f img/s  warm-up/compile %.1f s",
        row["label"],
        epoch.seconds,
        row["images_per_s"],
        first.seconds,
    )
    return row


def run(settings: Settings, sources: DataSources) -> dict:
    device = settings.device
    bundle = sources.bundle()
    arch = get_arch(settings.hs_arch)
    lr = BASE_LR * settings.hs_batch / 256
    variants: list[tuple[str, object]] = [("eager", None)]
    notes: list[str] = []
    if settings.compile:
        variants += [(f"torch.compile {m}", m) for m in settings.compile_modes]
    else:
        notes.append("torch.compile variants skipped (--compile is off; default off on CPU, on with CUDA)")
    rows = []
    for label, mode in variants:
        try:
            rows.append(_one_variant(label, mode, arch, bundle, lr, settings))
        except Exception as exc:  # noqa: BLE001 - a failing compile mode is reported, the others still run
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            notes.append(f"{label} failed: {type(exc).__name__}: {msg}")
            log.warning("hs_epoch: %s failed: %s", label, msg)
        finally:
            if mode is not None:
                torch._dynamo.reset()
            free_memory(device)
    eager = next((r for r in rows if r["compile_mode"] is None), None)
    best = min(rows, key=lambda r: r["value"]) if rows else None
    compiled = [r for r in rows if r["compile_mode"] is not None]
    best_compiled = min(compiled, key=lambda r: r["value"]) if compiled else None
    return {
        "title": f"HS epoch {arch.name} 32px batch {settings.hs_batch}",
        "settings": {
            "arch": arch.name,
            "strides": list(arch.strides),
            "data": settings.data,
            "images": int(bundle.train.num_samples),
            "batch": settings.hs_batch,
            "drop_last": True,
            "steps_per_epoch": len(bundle.train),
            "lr": lr,
            "momentum": MOMENTUM,
            "nesterov": True,
            "weight_decay": WD,
            "amp": "bf16" if settings.amp else "off",
            "channels_last": settings.channels_last,
            "compile_modes": [m for _, m in variants if m],
        },
        "rows": rows,
        "ratios": {
            "eager_s_per_50k": eager["s_per_50k"] if eager else None,
            "best_s_per_50k": best["s_per_50k"] if best else None,
            "best_variant": best["key"] if best else None,
            "compiled_speedup": eager["value"] / best_compiled["value"] if eager and best_compiled else None,
        },
        "notes": notes,
    }
