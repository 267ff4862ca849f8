"""Section ``train``: one training step (forward + backward + optimizer step) per model kind.

Each model is built fresh, with its optimizer exactly as the stage apps build it: the RepOpt-VGG
target with ``build_repopt`` (re-initialization + masked ``RepOptSGD``), RepVGG with plain SGD
over the same groups, and the HS/CSLA model (unfused and fused forward) with plain SGD. The input
is one fixed random batch already on the device, so the figure is the model + optimizer cost only.
On CUDA: bf16 autocast and channels_last (unless switched off). Peak memory is measured for each
model alone (build + warm-up steps); the step times are then taken in interleaved rounds, one step
of every model per round, so that a change in machine load hits all of them alike.
"""

from __future__ import annotations

import logging
import math

import torch

from hypersearch.model import build_hs_model
from repopt.engine import TrainStep
from repopt.scales import random_scales
from repopt.vgg.arch import get_arch
from target_train import build_optimizer, build_repopt, build_repvgg_model, build_target_model

from .memory import PeakMemory
from .settings import Settings, place, runtime
from .timing import free_memory, ratio, summarize_ms, time_rounds, timing_note

log = logging.getLogger("repopt.benchmark")

LR, WD = 0.1, 4e-5


def _variants(arch, settings: Settings):
    """(key, label, build() -> (model, optimizer))."""

    def target():
        model = place(build_target_model(arch, settings.num_classes), settings)
        return model, build_repopt(model, random_scales(arch, settings.seed, signed=False), "sgd", lr=LR, weight_decay=WD)

    def plain(build_model):
        def build():
            model = place(build_model(), settings)
            return model, build_optimizer(model, "sgd", LR, WD)

        return build

    def hs(fused):
        return plain(lambda: build_hs_model(arch, settings.num_classes, mode="hs", fused_forward=fused))

    return [
        ("target", "RepOpt-VGG target + RepOptSGD", target),
        ("repvgg", "RepVGG (multi-branch) + SGD", plain(lambda: build_repvgg_model(arch, settings.num_classes))),
        ("hs_unfused", "HS/CSLA, fused_forward=False + SGD", hs(False)),
        ("hs_fused", "HS/CSLA, fused_forward=True + SGD", hs(True)),
    ]


def make_step(model, optimizer, x, y, settings: Settings):
    """One call of the trainer's ``TrainStep`` on a fixed batch; ``step.last["loss"]`` is its latest loss."""
    train_step = TrainStep(model, optimizer, runtime(settings))
    last = {}

    def step():
        loss, _ = train_step(x, y)
        last["loss"] = loss
        return loss

    step.last = last
    return step


def run(settings: Settings) -> dict:
    device = settings.device
    arch = get_arch(settings.train_arch)
    g = torch.Generator().manual_seed(settings.seed)
    x = torch.randn(settings.batch, 3, settings.resolution, settings.resolution, generator=g).to(device)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, settings.num_classes, (settings.batch,), generator=g).to(device)
    rows = {}
    probe = PeakMemory(device)
    variants = _variants(arch, settings)
    # untimed: one step of the first model, so that one-time library set-up (oneDNN / cuDNN
    # initialisation, first kernel selection) is charged to no variant's time or memory
    torch.manual_seed(settings.seed)
    model, optimizer = variants[0][2]()
    make_step(model, optimizer, x, y, settings)()
    del model, optimizer
    free_memory(device)
    # memory: each model is built and trained for its warm-up steps (at least one) alone; the
    # peak is what it added over the memory in use before it was built (models stay alive)
    live, calls = {}, {}
    for key, label, build in variants:
        torch.manual_seed(settings.seed)
        probe.start()
        model, optimizer = build()
        model.train()
        step = make_step(model, optimizer, x, y, settings)
        for _ in range(max(settings.warmup, 1)):
            step()
        rows[key] = {
            "key": key,
            "label": label,
            "unit": "img/s",
            "value": None,
            "peak_mem_mib": probe.stop(),
            "mem_kind": probe.kind,
        }
        live[key] = (model, optimizer)
        calls[key] = (step, None)
    # time: interleaved rounds, one step of every model per round
    samples = time_rounds(calls, device, settings.steps, 0)
    for key, ms in samples.items():
        summary = summarize_ms(ms)
        loss = float(calls[key][0].last["loss"].detach())  # the last timed step's
        rows[key].update(value=settings.batch / (summary["ms"] / 1e3), **summary, loss_finite=math.isfinite(loss))
        peak = rows[key]["peak_mem_mib"]
        log.info(
            "train: %-36s %9.1f img/s  %8.1f ms/step  peak %s MiB",
            rows[key]["label"],
            rows[key]["value"],
            summary["ms"],
            "n/a" if peak is None else f"{peak:.0f}",
        )
    del live, calls, samples, model, optimizer, step
    free_memory(device)
    return {
        "title": f"training step {arch.name} {settings.resolution}px batch {settings.batch}",
        "settings": {
            "arch": arch.name,
            "resolution": settings.resolution,
            "batch": settings.batch,
            "num_classes": settings.num_classes,
            "steps": settings.steps,
            "warmup": settings.warmup,
            "amp": "bf16" if settings.amp else "off",
            "channels_last": settings.channels_last,
            "lr": LR,
            "weight_decay": WD,
            "memory": probe.kind,
            "timing": timing_note(device, "models"),
        },
        "rows": list(rows.values()),
        "ratios": {
            "target_over_repvgg_img_s": ratio(rows, "target", "repvgg", "value"),
            "target_over_repvgg_peak_mem": ratio(rows, "target", "repvgg", "peak_mem_mib"),
            "hs_fused_over_hs_unfused_img_s": ratio(rows, "hs_fused", "hs_unfused", "value"),
        },
        "notes": []
        if device.type == "cuda"
        else [
            "CPU memory is the rise of the process's peak RSS while the model was built and trained: it includes "
            "allocator slack and oneDNN scratch space, so treat it as indicative"
        ],
    }
