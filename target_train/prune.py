"""``python -m target_train.prune run=<stage-two run dir> ratio=0.5`` (console script ``repopt-prune``).

Structured channel pruning of a trained stage-two VGG, fine-tuned, measured and exported
(docs/design.md, "Pruning"):

1. load ``best.pt`` (or ``last.pt``) and the run's own training and data config;
2. prune ``ratio`` of every layer's output channels with Torch-Pruning (``importance=l2`` group
   magnitude, or ``bn_scale``; widths rounded down to ``round_to``; the classifier and the image
   input are never pruned):
   * a RepOpt-VGG run (``model=target``) is pruned as trained, a plain conv+BN+ReLU stack, and its
     grad masks and scales are sliced with the kept channels, so fine-tuning with the RepOptimizer
     stays exactly the pruned CSLA model's SGD;
   * a RepVGG run (``model=repvgg``) is folded first and its deployed form pruned with the same
     importance and ratio (``repvgg_mode=deploy``, the default: what is deployed is what is
     pruned, every layer free), then fine-tuned as a plain VGG with plain SGD. ``repvgg_mode=branches``
     prunes the multi-branch model instead (its identity branches tie whole chains of layers to one
     channel set), fine-tunes it as RepVGG and folds it afterwards. A QARepVGG run (``model=qarepvgg``)
     is pruned the same way in either mode (method ``qarepvgg-deploy`` / ``qarepvgg-branches``);
3. fine-tune for ``epochs`` on the run's data config at ``lr_factor`` x the run's learning rate;
4. fold, export ``pruned.pt`` (torch.export, loads without this package) and ``pruned.onnx``,
   check ONNX Runtime against PyTorch, and time both the unpruned and the pruned model through
   ONNX Runtime at batch 1 and 32 in the same process; optionally INT8 (``int8=true``).

Everything goes to ``<run>/<out>/`` (default ``pruned/``): ``metrics.json``, ``history.csv``,
``pruned.pt``, ``pruned.onnx``, ``prune.json`` (kept channels per layer). The folder is built in
a scratch folder and moved into place only when every check passed, so a failure leaves the run
as it was. The fine-tune is short and not resumable: an interrupted one is run again.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import hydra
import torch
from omegaconf import DictConfig

from repopt.app import run_guarded
from repopt.config import LoggerConfig, register_schema, require, to_typed
from repopt.engine.meter import evaluate
from repopt.errors import ConfigError
from repopt.host import cpu_name
from repopt.io import write_json
from repopt.numerics import rel_diff
from repopt.optim import optimizer_kwargs
from repopt.results import ChannelPruning, StageMetrics, Status
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
from .pruning.channels import IMPORTANCES, check_prunable, prune_vgg, require_torch_pruning
from .pruning.masks import slice_masks
from .pruning.measure import params_and_macs

log = logging.getLogger("target_train.prune")

REPVGG_MODES = ("deploy", "branches")


@dataclass
class PruneConfig:
    run: Optional[str] = None  # the stage-two run directory (required)
    checkpoint: str = "best"  # best | last (best falls back to last when the run has no best.pt)
    ratio: float = 0.5  # fraction of each layer's output channels to remove, in [0, 1)
    importance: str = "l2"  # l2 (group L2 magnitude) | bn_scale (|BN gamma|; not for the deploy form)
    round_to: Optional[int] = 8  # kept widths rounded down to a multiple of this; null = exact
    repvgg_mode: str = "deploy"  # RepVGG/QARepVGG runs: deploy (prune the folded model) | branches (prune the multi-branch model)
    epochs: int = 3  # fine-tuning epochs (cosine from lr_factor x the run's lr to its min_lr, no warm-up)
    lr_factor: float = 0.1  # fine-tuning lr = lr_factor x the run's optim.lr (cosine, no warm-up)
    max_steps_per_epoch: Optional[int] = None  # cap fine-tuning steps per epoch (smoke tests)
    out: str = "pruned"  # the result folder, inside the run directory
    overwrite: bool = False  # replace an existing result folder of that name
    device: str = "auto"  # fine-tuning device: auto | cpu | cuda | cuda:N | mps
    data_root: Optional[str] = None  # override the data root stored in the run's config
    eval_images: Optional[int] = None  # null = the whole test set
    latency_runs: int = 20  # ONNX Runtime: median over this many runs, after latency_warmup runs
    latency_warmup: int = 3  # untimed runs before the latency_runs
    threads: Optional[int] = None  # ONNX Runtime intra-op threads; null = its default
    opset: int = 17  # ONNX opset of pruned.onnx
    int8: bool = False  # also quantize pruned.onnx (static INT8, as target_train.export) and evaluate it
    calibration_images: int = 512  # int8=true: training images for the INT8 calibration
    progress: str = "auto"  # auto | bar | log | off

    def check(self, prefix: str = "", need_run: bool = True) -> None:
        """Ranges, with keys named as typed (``prefix``: ``pruning.`` in the pipeline, which sets ``run``)."""
        if need_run and self.run in (None, ""):
            raise ConfigError("run= is required: pass the stage-two run directory, e.g. run=outputs/target_train/<date>/<time>")
        k = lambda key: prefix + key  # noqa: E731
        require(self.checkpoint in ("best", "last"), k("checkpoint"), self.checkpoint, "best or last")
        require(0 < self.ratio < 1, k("ratio"), self.ratio, "in (0, 1): the fraction of each layer's channels to remove")
        require(self.importance in IMPORTANCES, k("importance"), self.importance, "one of " + ", ".join(IMPORTANCES))
        require(self.round_to is None or self.round_to >= 1, k("round_to"), self.round_to, ">= 1 or null")
        require(self.repvgg_mode in REPVGG_MODES, k("repvgg_mode"), self.repvgg_mode, "one of " + ", ".join(REPVGG_MODES))
        require(self.epochs >= 0, k("epochs"), self.epochs, ">= 0 (0: no fine-tuning)")
        require(self.lr_factor > 0, k("lr_factor"), self.lr_factor, "> 0")
        require(
            self.out not in ("", ".", "..") and "/" not in self.out and "\\" not in self.out,
            k("out"),
            self.out,
            "a folder name inside the run directory",
        )
        for key in ("latency_runs", "calibration_images"):
            require(getattr(self, key) >= 1, k(key), getattr(self, key), ">= 1")
        require(self.latency_warmup >= 0, k("latency_warmup"), self.latency_warmup, ">= 0")
        require(self.opset >= 17, k("opset"), self.opset, ">= 17")


register_schema("prune_schema", PruneConfig)


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
        created=_dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
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
        work / "pruned.onnx", int8_path, calibration_batches(data, cfg.calibration_images, q.CALIBRATION_BATCH), settings, work
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


def run_prune_app(cfg: DictConfig) -> StageMetrics | None:
    """The project's command-line conventions: bad input -> one clear line and exit code 1."""

    def body():
        metrics = prune_run(to_typed(cfg, PruneConfig))
        log.info("pruned:\n%s", format_summary(metrics))  # logged, not printed: the step's prune.log keeps it too
        return metrics

    return run_guarded(body)


@hydra.main(version_base="1.3", config_path="pkg://repopt.conf", config_name="prune")
def main(cfg: DictConfig):
    return run_prune_app(cfg)


if __name__ == "__main__":
    main()
