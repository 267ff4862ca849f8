"""The quantization-aware training step on a finished stage-two run: torchao PT2E QAT of the folded
model, ONNX export and checks (what it does and writes: ``target_train/qat.py``, the app)."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from repopt.engine.runtime import Runtime
from repopt.engine.step import TrainStep
from repopt.errors import ConfigError, DivergenceError
from repopt.family import family_of
from repopt.host import cpu_name
from repopt.io import sha256_file, write_json, write_text
from repopt.modules import unwrap
from repopt.numerics import rel_diff
from repopt.results import QAT_RESULT, created_now

from . import quantize as q
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
from .onnx_io import ExportError, OnnxMismatchError, export_onnx, onnx_opset, qdq_node_types
from .optim import RepOptSGD
from .ort_quantizer import make_quantizer
from .step_config import DEFAULT_LR_PER_256, QatConfig, validate_qat

log = logging.getLogger("target_train.qat")


# ONNX Runtime against the converted (reference-quantized) PyTorch model: max |difference| of the
# logits over max(max |logit|, 1). The two compute the same integers except where a float summed in
# another order tips a requantization across a .5 boundary: one activation moves by one step, and the
# logits by a few steps of their own int8 grid (1/255 of their range). Measured on a 64-image test
# batch: the trained tiny VGG 0-1 logit steps (<= 0.008 of max|logit|); the tiny GhostNet at chance,
# logits within +-0.04, 5 steps (0.0012 absolute: hence the floor of 1, below which a difference
# counts in absolute terms). A wrong scale, zero point, axis or bias is off by the order of the logits.
ONNX_MAX_DIFF = 0.05
LOGIT_FLOOR = 1.0


# ---------------------------------------------------------------------------- inputs


def require_torchao():
    """Import torchao's PT2E QAT flow, or say how to install it."""
    try:
        import torchao
        from torchao.quantization.pt2e.quantize_pt2e import (  # noqa: F401
            convert_pt2e,
            prepare_qat_pt2e,
        )
    except ImportError as exc:
        raise ConfigError(f"the QAT step needs torchao ({exc}); install it with: pip install 'repopt-pipeline[qat]'") from None
    return torchao


@torch.no_grad()
def folded_masks(model: torch.nn.Module, deployed: torch.nn.Module, scales) -> dict[str, torch.Tensor]:
    """The run's SGD grad masks carried through the BN fold, keyed by the deployed conv weights' names.

    A RepOpt-VGG block is conv (W) -> BN; folding gives W' = t * W per output channel, t = gamma /
    sqrt(var + eps). With the BN frozen (as in the folded model), dL/dW = t * dL/dW', so the
    RepOptimizer's step on W, dW = -lr (M * dL/dW), is the step dW' = t dW = -lr (t^2 M) * dL/dW' on the
    folded kernel: the mask of the folded kernel is t^2 M, exactly (momentum is linear, and the
    RepOptimizer adds decay after the mask, unmasked; QAT uses none). M alone would be off by t^2 per
    output channel.
    """
    family = family_of(unwrap(model)).name
    if family != "vgg":
        raise ConfigError(
            f"masks=true carries RepOpt-VGG masks (each block a conv followed by its BN) through the "
            f"fold; this is a family={family} run: use masks=false"
        )
    masks = grad_masks(model, scales, rule="sgd")
    modules = dict(model.named_modules())
    targets = dict(deployed.named_parameters())
    out = {}
    for name, mask in masks.items():
        block = name.rsplit(".", 2)[0]  # "stage1.0" of "stage1.0.conv.weight"
        bn = modules.get(f"{block}.bn")
        if not isinstance(bn, torch.nn.BatchNorm2d) or name not in targets or targets[name].shape != mask.shape:
            raise ConfigError(
                f"masks=true carries RepOpt-VGG masks (a conv followed by its BN) through the fold; "
                f"{name} has no such BN or no folded kernel of its shape; use masks=false"
            )
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        t = gamma / (bn.running_var + bn.eps).sqrt()
        out[name] = (mask * t.square().view(-1, 1, 1, 1)).to(torch.float32)
    return out


class TorchSession:
    """A PyTorch module behind ONNX Runtime's ``run`` signature, so ``quantize.evaluate`` scores both alike."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    @torch.no_grad()
    def run(self, outputs, feed: dict) -> list[np.ndarray]:
        return [self.module(torch.from_numpy(feed[q.INPUT_NAME])).numpy()]


# ---------------------------------------------------------------------------- the app
def qat_run(cfg: QatConfig) -> dict:
    validate_qat(cfg)
    settings = q.choose_settings(cfg.activation_type, cfg.reduce_range, cfg.per_channel, "minmax")
    ort = q.require_onnxruntime()
    torchao = require_torchao()
    run_dir, ckpt_path = find_run(cfg)
    model, ckpt = load_model(ckpt_path)
    if cfg.masks and ckpt.get("scales") is None:
        raise ConfigError(
            f"masks=true needs the run's scales, but {ckpt_path} records none (a model={ckpt.get('mode')} "
            f"or scales=none run trains without masks); use masks=false"
        )
    stored = stored_config(ckpt, run_dir)
    deployed = fuse(model)
    masks = None
    if cfg.masks:
        if stored.get("masks") is False:
            log.warning("the run trained without masks (masks=false); QAT applies them anyway (masks=true)")
        masks = folded_masks(model, deployed, ckpt["scales"])
    data_cfg, seed = data_config(ckpt, run_dir, cfg)
    bundle = load_data(data_cfg, seed, cfg)
    check_classes(bundle.num_classes, ckpt, data_cfg.root)
    with scratch_dir(run_dir, ".qat-") as work:
        torch.manual_seed(seed)
        return _qat_in(work, cfg, run_dir, ckpt_path, ckpt, stored, deployed, masks, bundle, data_cfg, settings, ort, torchao)


def _train(prepared, cfg: QatConfig, bundle, lr: float, masks, label_smoothing: float, history: list[dict]) -> int:
    """QAT epochs on the prepared (fake-quantized) model; one ``history`` row per epoch. Returns the steps."""
    from torchao.quantization.pt2e import enable_observer, move_exported_model_to_train

    params = [p for p in prepared.parameters() if p.requires_grad]
    if masks:
        by_name = dict(prepared.named_parameters())
        missing = [n for n in masks if n not in by_name]
        if missing:
            raise ConfigError(f"masks=true: the exported model has no parameter {missing[0]!r}; use masks=false")
        # the project's masked SGD: the mask, then torch's SGD step
        optimizer = RepOptSGD(params, {by_name[n]: m for n, m in masks.items()}, lr=lr, momentum=cfg.momentum, compiled=False)
    else:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum)
    total = cfg.epochs * len(bundle.train)
    train_step = TrainStep(prepared, optimizer, Runtime(torch.device("cpu"), None, False), label_smoothing=label_smoothing)
    step = 0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        move_exported_model_to_train(prepared)
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in bundle.train.epoch(epoch):
            for group in optimizer.param_groups:  # cosine to 0, per step
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
            loss, logits = train_step(x, y)  # the project's one training step (repopt/engine/step.py)
            if not torch.isfinite(loss):
                raise DivergenceError(f"QAT loss is {loss.item()} at step {step}; lower lr (now {lr:g})", step)
            step += 1
            loss_sum += float(loss) * x.shape[0]
            correct += int((logits.argmax(1) == y).sum())
            seen += int(x.shape[0])
        row = {
            "epoch": epoch + 1,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / max(1, seen),
            "train_top1": 100.0 * correct / max(1, seen),
            "fake_quant_test_top1": None,
            "epoch_seconds": time.perf_counter() - t0,
        }
        if epoch + 1 < cfg.epochs:  # the last epoch is scored by the final evaluation
            freeze(prepared)  # scoring must not move the ranges towards the test set
            row["fake_quant_test_top1"] = q.evaluate({"fq": TorchSession(prepared)}, bundle.test.epoch(0), bundle.num_classes)[
                "fq_top1"
            ]
            prepared.apply(enable_observer)
        history.append(row)
        log.info(
            "qat epoch %d/%d  lr %.2e  train_loss %.4f  train_top1 %.2f%s  (%.1f s)",
            epoch + 1,
            cfg.epochs,
            row["lr"],
            row["train_loss"],
            row["train_top1"],
            f"  fake-quant test_top1 {row['fake_quant_test_top1']:.2f}" if row["fake_quant_test_top1"] is not None else "",
            row["epoch_seconds"],
        )
    return step


# ---------------------------------------------------------------------------- the torchao pieces
def prepare(deployed: torch.nn.Module, settings: q.QuantSettings, example: torch.Tensor) -> torch.fx.GraphModule:
    """A copy of the folded model captured by ``torch.export`` (dynamic batch) with fake quantization
    inserted. A copy: the exported module shares the original's parameter tensors, and training it would
    change ``deployed``, the FP32 reference."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    batch = torch.export.Dim("batch", min=1, max=65536)
    exported = torch.export.export(copy.deepcopy(deployed), (example,), dynamic_shapes=({0: batch},)).module()
    return prepare_qat_pt2e(exported, make_quantizer(settings))


@torch.no_grad()
def calibrate(prepared: torch.fx.GraphModule, batches) -> int:
    """Run ``batches`` through the prepared model so its observers start from real ranges; the image count."""
    seen = 0
    for x in batches:
        prepared(x)
        seen += int(x.shape[0])
    return seen


def freeze(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Inference mode with the ranges fixed: scoring or converting must not move them."""
    from torchao.quantization.pt2e import disable_observer, move_exported_model_to_eval

    move_exported_model_to_eval(prepared)
    prepared.apply(disable_observer)
    return prepared


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The reference-quantized model (int8 weights, int32 biases, quantize/dequantize ops) of a frozen
    copy of ``prepared``; ``prepared`` itself stays usable."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    converted = convert_pt2e(copy.deepcopy(freeze(prepared)))
    move_exported_model_to_eval(converted)
    for module in converted.modules():  # eval() is refused on exported graphs; the exporter reads the flag
        module.training = False
    return converted


@contextlib.contextmanager
def _quiet(*names: str):
    """The dynamo exporter's passes log every rewrite at INFO under Hydra's root logger: keep them out."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_qat_onnx(converted: torch.fx.GraphModule, path: Path, image_size: int, opset: int) -> dict[str, int]:
    """Write the converted model as QDQ ONNX (dynamic batch); its node-type counts."""
    with _quiet("onnxscript", "onnx_ir"):
        export_onnx(converted, path, image_size, opset, "dynamo")
    return qdq_node_types(path, "the QAT model's ONNX file")


def floored_diff(out, ref) -> float:
    """max |out - ref| / max(max |ref|, LOGIT_FLOOR): ``ONNX_MAX_DIFF``'s measure."""
    out, ref = torch.as_tensor(out, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(LOGIT_FLOOR))


def output_step(converted: torch.fx.GraphModule) -> float:
    """The scale of the converted model's output grid (the quantizer always quantizes the logits)."""
    out = next(n for n in converted.graph.nodes if n.op == "output").args[0]
    node = out[0] if isinstance(out, (tuple, list)) else out
    if getattr(node, "target", None) != torch.ops.quantized_decomposed.dequantize_per_tensor.default:
        raise ExportError(
            f"the converted model's logits are not quantized (they come from {node}); "
            f"the QAT quantizer did not annotate the classifier"
        )
    scale = node.args[1]
    return float(getattr(converted, scale.target) if isinstance(scale, torch.fx.Node) else scale)


# ---------------------------------------------------------------------------- the step
def _qat_in(
    work: Path,
    cfg: QatConfig,
    run_dir: Path,
    ckpt_path: Path,
    ckpt,
    stored: dict,
    deployed,
    masks,
    bundle,
    data_cfg,
    settings: q.QuantSettings,
    ort,
    torchao,
) -> dict:
    int8_path = work / "model.qat.int8.onnx"
    x_check, _ = next(iter(bundle.test.epoch(0)))
    x_check = x_check[:64]
    prepared = prepare(deployed, settings, x_check[:2])
    # the observers start from the ranges export would calibrate on
    calibrated = calibrate(prepared, calibration_batches(bundle, cfg.calibration_images, cfg.calibration_batch))
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR_PER_256 * data_cfg.batch_size / 256
    log.info(
        "QAT of %s (%s, %s): %d epochs, lr %.3g (cosine to 0), momentum %g, masks=%s; %s activations / %s weights, "
        "per_channel=%s, reduce_range=%s; observers warmed on %d images",
        ckpt_path,
        ckpt["mode"],
        ckpt["arch"]["name"],
        cfg.epochs,
        lr,
        cfg.momentum,
        cfg.masks,
        settings.activation_type,
        settings.weight_type,
        settings.per_channel,
        settings.reduce_range,
        calibrated,
    )
    history: list[dict] = []
    steps = _train(prepared, cfg, bundle, lr, masks, float(stored.get("label_smoothing", 0.0) or 0.0), history)

    converted = convert(prepared)  # freezes the ranges of ``prepared`` too
    with torch.no_grad():
        fake_quant_logits = prepared(x_check)
        converted_logits = converted(x_check)
    log.info("exporting the converted model to ONNX opset %d (dynamo exporter)", cfg.opset)
    nodes = export_qat_onnx(converted, int8_path, data_cfg.image_size, cfg.opset)
    int8 = q.session(int8_path, cfg.threads)
    onnx_logits = q.run_session(int8, x_check)
    onnx_vs_converted = rel_diff(onnx_logits, converted_logits)
    step = output_step(converted)
    worst = float(np.abs(onnx_logits - converted_logits.numpy()).max())
    grid_steps = worst / step  # both end in the same DequantizeLinear: whole steps of the logits' grid
    floored = floored_diff(onnx_logits, converted_logits)
    if not floored <= ONNX_MAX_DIFF:
        raise OnnxMismatchError(
            f"ONNX Runtime's INT8 logits differ from the converted PyTorch model's by {worst:.3g} "
            f"({floored:.2e} of max(max|logit|, {LOGIT_FLOOR:g}), bound {ONNX_MAX_DIFF:g}; "
            f"{grid_steps:.0f} steps of their int8 grid); nothing was written"
        )
    onnx_vs_fake_quant = rel_diff(onnx_logits, fake_quant_logits)
    log.info(
        "ONNX INT8 vs converted PyTorch: max rel diff %.2e, %.0f logit steps (vs the fake-quant model %.2e)",
        onnx_vs_converted,
        grid_steps,
        onnx_vs_fake_quant,
    )

    log.info("evaluating FP32, fake-quant and INT8 on %d test images", bundle.test.num_samples)
    acc = q.evaluate(
        {"fp32": TorchSession(deployed), "fake_quant": TorchSession(prepared), "int8": int8},
        bundle.test.epoch(0),
        bundle.num_classes,
    )
    if history:
        history[-1]["fake_quant_test_top1"] = acc["fake_quant_top1"]
    latency = {"int8": q.latency_table(int8, x_check, cfg.latency_runs, cfg.latency_warmup)}
    history_path = work / "qat_history.csv"
    columns = ["epoch", "step", "lr", "train_loss", "train_top1", "fake_quant_test_top1", "epoch_seconds"]
    write_text(
        history_path,
        "\n".join(
            [",".join(columns)]
            + [
                ",".join("" if row[c] is None else f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in columns)
                for row in history
            ]
        )
        + "\n",
    )
    import onnx

    result = {
        "model": ckpt["mode"],
        "arch": ckpt["arch"],
        "dataset": bundle.name,
        "num_classes": bundle.num_classes,
        "image_size": data_cfg.image_size,
        "checkpoint": str(ckpt_path),
        "trained_epochs": (ckpt.get("run") or {}).get("epoch"),
        "epochs": cfg.epochs,
        "steps": steps,
        "lr": lr,
        "lr_rule": "given" if cfg.lr is not None else f"{DEFAULT_LR_PER_256:g} x batch / 256",
        "schedule": "cosine to 0 per step",
        "optimizer": f"SGD momentum {cfg.momentum:g}, no weight decay" + (", RepOpt masks (folded)" if cfg.masks else ""),
        "masks": cfg.masks,
        "batch_size": data_cfg.batch_size,
        "label_smoothing": float(stored.get("label_smoothing", 0.0) or 0.0),
        "fp32_top1": acc["fp32_top1"],
        "fp32_top5": acc["fp32_top5"],
        "fake_quant_top1": acc["fake_quant_top1"],
        "fake_quant_top5": acc["fake_quant_top5"],
        "int8_top1": acc["int8_top1"],
        "int8_top5": acc["int8_top5"],
        "top1_drop": acc["fp32_top1"] - acc["int8_top1"],
        "top5_drop": acc["fp32_top5"] - acc["int8_top5"],
        "top5_k": acc["top5_k"],
        "eval_images": acc["images"],
        "calibration_images": calibrated,
        "onnx_int8_vs_converted_max_rel_diff": onnx_vs_converted,
        "onnx_int8_vs_fake_quant_max_rel_diff": onnx_vs_fake_quant,
        "onnx_int8_vs_converted_logit_steps": grid_steps,
        "onnx_int8_vs_converted_floored_diff": floored,
        "onnx_floored_diff_bound": ONNX_MAX_DIFF,
        "logit_step": step,
        "latency_ms_per_image": latency,
        "latency_runs": cfg.latency_runs,
        "opset": onnx_opset(int8_path),
        "exporter": "dynamo",
        "quantization": {
            **settings.to_dict(),
            "calibration_method": None,
            "ranges": "moving-average min/max during QAT (torchao FakeQuantize), warmed on un-augmented "
            "training images, frozen before conversion",
            "bias": "int32, scale = input scale x weight scale (float in the training forward)",
        },
        "int8_node_types": nodes,
        "history": "qat_history.csv",
        "files": {"model.qat.int8.onnx": {"bytes": int8_path.stat().st_size, "sha256": sha256_file(int8_path)}},
        "versions": {
            "torch": torch.__version__,
            "torchao": torchao.__version__,
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
        },
        "cpu": cpu_name(),
        "threads": cfg.threads,
        "created": created_now(),
    }
    # every check passed: move the files into the run directory (each rename is atomic), qat.json last
    os.replace(int8_path, run_dir / "model.qat.int8.onnx")
    os.replace(history_path, run_dir / "qat_history.csv")
    write_json(run_dir / QAT_RESULT, result)
    log.info("QAT result:\n%s", format_table(result))  # logged, not printed: the step's qat.log keeps it too
    return result


def format_table(r: dict) -> str:
    lat = r["latency_ms_per_image"]["int8"]
    head = (
        f"{r['model']} {r['arch']['name']} on {r['dataset']}: QAT {r['epochs']} epochs at lr {r['lr']:.3g}, "
        f"{r['eval_images']} test images"
    )
    int8 = (
        f"{'int8 (ORT)':<11} {r['int8_top1']:>7.2f} {r['int8_top5']:>7.2f}   "
        f"{lat['batch1']:.3f} / {lat['batch32']:.3f} ms/img at batch 1 / 32"
    )
    tail = (
        f"top-1 drop {r['top1_drop']:.2f} points; ONNX INT8 vs converted max rel diff "
        f"{r['onnx_int8_vs_converted_max_rel_diff']:.1e}"
    )
    return "\n".join(
        [
            head,
            f"{'':<11} {'top-1':>7} {'top-5':>7}",
            f"{'fp32':<11} {r['fp32_top1']:>7.2f} {r['fp32_top5']:>7.2f}",
            f"{'fake-quant':<11} {r['fake_quant_top1']:>7.2f} {r['fake_quant_top5']:>7.2f}",
            int8,
            tail,
        ]
    )
