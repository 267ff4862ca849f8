"""The channel-pruning step on a finished stage-two VGG run: prune, fine-tune, fold, export and time
(what it does and writes: ``target_train/prune.py``, the app; the pieces: ``target_train/pruning/``)."""

from __future__ import annotations

import copy
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from repopt.config import LoggerConfig, to_typed
from repopt.engine.meter import evaluate
from repopt.errors import ConfigError
from repopt.host import cpu_name
from repopt.io import write_json
from repopt.numerics import rel_diff
from repopt.optim import optimizer_kwargs
from repopt.results import ChannelPruning, StageMetrics, Status, created_now
from repopt.setup import make_trainer, place, run_records, scaled_lr, start

from . import quantize as q
from .config import TargetConfig
from .deploy import MAX_REL_DIFF, cpu_fp32, save_deployed
from .finished_run import (
    calibration_batches,
    check_classes,
    data_config,
    find_run,
    load_data,
    load_model,
    scratch_dir,
    stored_config,
)
from .handler import fuse, grad_masks
from .onnx_io import OnnxMismatchError, export_onnx
from .optim import build_optimizer
from .pruning.channels import check_prunable, prune_vgg, require_torch_pruning
from .pruning.masks import slice_masks
from .pruning.measure import params_and_macs
from .step_config import CALIBRATION_BATCH, PruneConfig

log = logging.getLogger("target_train.prune")


# ---------------------------------------------------------------------------- inputs
def finetune_config(ckpt: dict, run_dir: Path, cfg: PruneConfig) -> TargetConfig:
    """The run's own training config, turned into the short fine-tuning schedule."""
    tcfg = to_typed(stored_config(ckpt, run_dir), TargetConfig)
    data, _ = data_config(ckpt, run_dir, cfg)
    return replace(
        tcfg,
        data=data,
        epochs=max(cfg.epochs, 1),
        resume=False,
        deploy=False,
        compile=False,
        run_dir=None,
        device=cfg.device,
        progress=cfg.progress,
        max_steps_per_epoch=cfg.max_steps_per_epoch,
        sched=replace(tcfg.sched, warmup_epochs=0.0),
        optim=replace(tcfg.optim, lr=tcfg.optim.lr * cfg.lr_factor, compile_step=False),
        ema=replace(tcfg.ema, enabled=False),
        logger=LoggerConfig(),
    )


def method_of(mode: str, scales, cfg: PruneConfig) -> str:
    if mode == "target":
        return "repopt" if scales is not None else "plain"
    return f"{mode}-{cfg.repvgg_mode}"  # a re-parameterization baseline: repvgg-deploy, qarepvgg-branches, ...


def evaluate_model(model: torch.nn.Module, data, runtime) -> dict:
    """Test loss, top-1 and top-5 of ``model``, which is left in train mode."""
    metrics = evaluate(model, data.test, runtime, data.num_classes)
    model.train()
    return metrics


# ---------------------------------------------------------------------------- the step
def prune_run(cfg: PruneConfig) -> StageMetrics:
    cfg.check()
    require_torch_pruning()
    q.require_onnxruntime()
    run_dir, ckpt_path = find_run(cfg)
    out_dir = run_dir / cfg.out
    if out_dir.exists() and not cfg.overwrite:
        raise ConfigError(
            f"{out_dir} already holds a pruning result; pass overwrite=true to replace it, "
            f"or out=<another folder name> to keep both (nothing was changed)"
        )
    model, ckpt = load_model(ckpt_path)
    check_prunable(model)
    if ckpt.get("mode") == "target" and ckpt.get("scales") is None:
        log.warning("%s was trained with plain SGD (scales=none): it is fine-tuned with plain SGD", ckpt_path)
    with scratch_dir(run_dir, ".prune-") as work:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(work, 0o777 & ~umask)  # mkdtemp's folder is private; the result folder is an ordinary one
        metrics = _prune_in(work, cfg, run_dir, ckpt_path, model, ckpt)
        if out_dir.exists():  # overwrite=true: the old result goes only once the new one is complete
            with scratch_dir(run_dir, ".pruned-old-") as old:
                os.replace(out_dir, old / out_dir.name)
                os.replace(work, out_dir)
        else:
            os.replace(work, out_dir)
        log.info("pruning result in %s", out_dir)
        return metrics


def _prune_in(work: Path, cfg: PruneConfig, run_dir: Path, ckpt_path: Path, model, ckpt: dict) -> StageMetrics:
    tcfg = finetune_config(ckpt, run_dir, cfg)
    runtime, data = start(tcfg)
    check_classes(data.num_classes, ckpt, tcfg.data.root)
    image_size = tcfg.data.image_size
    mode, scales = ckpt["mode"], ckpt.get("scales") if ckpt["mode"] == "target" else None
    method = method_of(mode, scales, cfg)
    arch = model.arch
    unpruned = fuse(model)  # the deployed model the pruned one is measured against (load_model: CPU, fp32)
    baseline = mode != "target"  # load_model admits only the target and the family's re-parameterization baselines
    if baseline and cfg.repvgg_mode == "deploy":
        model = copy.deepcopy(unpruned).train()

    model = place(model, runtime)
    before = evaluate_model(model, data, runtime)
    masks = grad_masks(model, scales, rule=tcfg.optim.name) if scales is not None else None  # before pruning: from the arch
    log.info(
        "pruning %s (%s, %s) at ratio %.2f, importance %s, round_to %s; top-1 before %.2f",
        ckpt_path,
        mode,
        arch.name,
        cfg.ratio,
        cfg.importance,
        cfg.round_to,
        before["test_top1"],
    )
    plan = prune_vgg(model, cfg.ratio, cfg.importance, cfg.round_to, image_size)
    model = place(model, runtime)
    pruned = evaluate_model(model, data, runtime)
    log.info("pruned widths %s; top-1 %.2f before fine-tuning", [len(k) for k in plan.kept.values()], pruned["test_top1"])

    lr = scaled_lr(tcfg)
    optimizer = build_optimizer(
        model, lr=lr, masks=slice_masks(masks, plan) if masks is not None else None, **optimizer_kwargs(tcfg.optim)
    )
    extra, metrics_extra = run_records("prune", arch, data, mode)
    metrics_extra.update(model=mode, optimizer=type(optimizer).__name__)
    trainer = make_trainer(
        tcfg,
        runtime,
        data,
        model,
        optimizer,
        work,
        lr,
        checkpoint_extra={**extra, "plan": plan.to_dict()},
        metrics_extra=metrics_extra,
    )
    if cfg.epochs > 0:
        trainer.fit()
    (work / "last.pt").unlink(missing_ok=True)  # the fine-tune's resume point: the result is pruned.pt
    finetuned = trainer.state.history[-1] if cfg.epochs > 0 else pruned  # the last epoch's test metrics

    measured = _deploy_and_measure(work, cfg, model, unpruned, data, image_size)
    int8 = None
    if cfg.int8:
        cpu_data = data if runtime.device.type == "cpu" else load_data(tcfg.data, tcfg.seed, cfg)
        int8 = _int8(work, cfg, cpu_data)
    summary = ChannelPruning(
        **measured,
        int8=int8,
        method=method,
        ratio=cfg.ratio,
        importance=cfg.importance,
        round_to=cfg.round_to,
        repvgg_mode=cfg.repvgg_mode if baseline else None,
        source_run=str(run_dir),
        checkpoint=str(ckpt_path),
        top1_before=before["test_top1"],
        top5_before=before["test_top5"],
        top1_pruned=pruned["test_top1"],
        top5_pruned=pruned["test_top5"],
        top1_finetuned=finetuned["test_top1"],
        top5_finetuned=finetuned["test_top5"],
        widths_before=[int(plan.widths[n]) for n in plan.names],
        widths_after=[len(plan.kept[n]) for n in plan.names],
        finetune={
            "epochs": cfg.epochs,
            "lr": lr,
            "optimizer": type(optimizer).__name__,
            "device": runtime.describe(),
            "max_steps_per_epoch": cfg.max_steps_per_epoch,
        },
        created=created_now(),
    )
    write_json(
        work / "prune.json",
        {
            "arch": arch.to_dict(),
            "ratio": cfg.ratio,
            "importance": cfg.importance,
            "round_to": cfg.round_to,
            "method": method,
            **plan.to_dict(),
        },
    )
    if cfg.epochs == 0:
        trainer.write_history()
    metrics = trainer.write_metrics(
        Status.COMPLETED,
        channel_pruning=summary,
        deploy_file=str(run_dir / cfg.out / "pruned.pt"),
        deploy_max_rel_diff=summary.deploy_max_rel_diff,
    )
    log.info(
        "top-1 %.2f -> %.2f pruned -> %.2f fine-tuned; MACs x%.3f, params x%.3f; ONNX Runtime batch 1 %.3f -> %.3f ms",
        summary.top1_before,
        summary.top1_pruned,
        summary.top1_finetuned,
        summary.macs_ratio,
        summary.params_ratio,
        summary.latency_ms_per_image["unpruned"]["batch1"],
        summary.latency_ms_per_image["pruned"]["batch1"],
    )
    return metrics


def _deploy_and_measure(work: Path, cfg: PruneConfig, model, unpruned, data, image_size: int) -> dict:
    """pruned.pt and pruned.onnx (each checked against PyTorch), sizes, and both models' latency: the
    measured fields of the ChannelPruning record (its keyword arguments)."""
    cpu_model = cpu_fp32(model)
    deployed = fuse(cpu_model)
    deploy = save_deployed(deployed, cpu_model, work / "pruned.pt", image_size)
    export_onnx(deployed, work / "pruned.onnx", image_size, cfg.opset, "torchscript")
    scratch = work / ".unpruned"
    scratch.mkdir()
    export_onnx(unpruned, scratch / "unpruned.onnx", image_size, cfg.opset, "torchscript")

    x, _ = next(iter(data.test.epoch(0)))
    x = x[:64].detach().cpu().float().contiguous()
    with torch.no_grad():
        reference = cpu_model(x)
    sessions = {
        "unpruned": q.session(scratch / "unpruned.onnx", cfg.threads),
        "pruned": q.session(work / "pruned.onnx", cfg.threads),
    }
    onnx_diff = rel_diff(q.run_session(sessions["pruned"], x), reference)
    if not onnx_diff <= MAX_REL_DIFF:
        raise OnnxMismatchError(
            f"ONNX Runtime's FP32 logits of the pruned model differ from PyTorch's by {onnx_diff:.2e} "
            f"(bound {MAX_REL_DIFF:.0e}); nothing was written"
        )
    params0, macs0 = params_and_macs(unpruned, image_size)
    params1, macs1 = params_and_macs(deployed, image_size)
    times = {name: q.latency_table(sess, x, cfg.latency_runs, cfg.latency_warmup) for name, sess in sessions.items()}
    shutil.rmtree(scratch)
    summary = {
        "params_before": params0,
        "params_after": params1,
        "params_ratio": params1 / params0,
        "macs_before": macs0,
        "macs_after": macs1,
        "macs_ratio": macs1 / macs0,
        "latency_ms_per_image": times,
        "speedup": {b: times["unpruned"][b] / times["pruned"][b] for b in times["pruned"]},
        "latency_runs": cfg.latency_runs,
        "threads": cfg.threads,
        "cpu": cpu_name(),
        "onnx_fp32_max_rel_diff": onnx_diff,
        **deploy,
    }
    summary["deploy_file"] = "pruned.pt"
    import onnxruntime

    summary["versions"] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    return summary


def _int8(work: Path, cfg: PruneConfig, data) -> dict:
    """Static INT8 of pruned.onnx with the export's default settings, FP32 and INT8 top-1 on the test set."""
    settings = q.default_settings()
    int8_path = work / "pruned.int8.onnx"
    calibrated = q.quantize(
        work / "pruned.onnx", int8_path, calibration_batches(data, cfg.calibration_images, CALIBRATION_BATCH), settings, work
    )
    sessions = {"fp32": q.session(work / "pruned.onnx", cfg.threads), "int8": q.session(int8_path, cfg.threads)}
    acc = q.evaluate(sessions, ((x.cpu(), y.cpu()) for x, y in data.test.epoch(0)), data.num_classes)
    return {
        "calibration_images": calibrated,
        "fp32_top1": acc["fp32_top1"],
        "int8_top1": acc["int8_top1"],
        "top1_drop": acc["fp32_top1"] - acc["int8_top1"],
        "file": int8_path.name,
        **settings.to_dict(),
    }


def format_summary(m: StageMetrics) -> str:
    p = m.channel_pruning or ChannelPruning()
    lat = p.latency_ms_per_image or {}
    rows = [
        ("top-1 before", p.top1_before),
        ("top-1 pruned", p.top1_pruned),
        ("top-1 fine-tuned", p.top1_finetuned),
        ("MACs ratio", p.macs_ratio),
        ("params ratio", p.params_ratio),
    ]
    for which in ("unpruned", "pruned"):
        for b, ms in lat.get(which, {}).items():
            rows.append((f"ORT {which} {b} ms/img", ms))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows)
