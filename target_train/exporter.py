"""The export step on a finished stage-two run: fold, ONNX, INT8 PTQ, accuracy, latency and kernel
statistics, built in a scratch folder (what it does and writes: ``target_train/export.py``, the app)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from repopt.config import DataConfig
from repopt.errors import ConfigError
from repopt.host import cpu_name
from repopt.io import sha256_file, write_json
from repopt.numerics import rel_diff
from repopt.results import QuantResult, created_now, quant_name, to_dict

from . import quantize as q
from .deploy import MAX_REL_DIFF
from .finished_run import calibration_batches, check_classes, data_config, find_run, load_data, load_model, scratch_dir
from .handler import fuse
from .onnx_io import OnnxMismatchError, export_onnx, onnx_opset, qdq_node_types
from .step_config import ExportConfig, validate_export
from .weight_stats import layer_stats, summarize_layers

log = logging.getLogger("target_train.export")


def int8_name(tag: str) -> str:
    """The INT8 model's file name for ``tag`` (``model.int8.onnx`` untagged)."""
    return f"model.int8-{tag}.onnx" if tag else "model.int8.onnx"


# ---------------------------------------------------------------------------- inputs
# ---------------------------------------------------------------------------- the app
def export_run(cfg: ExportConfig) -> QuantResult:
    validate_export(cfg)
    ort = q.require_onnxruntime()
    run_dir, ckpt_path = find_run(cfg)
    model, ckpt = load_model(ckpt_path)
    settings = q.choose_settings(cfg.activation_type, cfg.reduce_range, cfg.per_channel, cfg.calibration_method)
    data_cfg, seed = data_config(ckpt, run_dir, cfg)
    bundle = load_data(data_cfg, seed, cfg)
    check_classes(bundle.num_classes, ckpt, data_cfg.root)
    deployed = fuse(model)
    with scratch_dir(run_dir, ".export-") as work:
        return _export_in(work, cfg, run_dir, ckpt_path, model, deployed, ckpt, bundle, data_cfg, settings, ort)


def _export_in(
    work: Path,
    cfg: ExportConfig,
    run_dir: Path,
    ckpt_path: Path,
    model,
    deployed,
    ckpt,
    bundle,
    data_cfg: DataConfig,
    settings: q.QuantSettings,
    ort,
) -> QuantResult:
    fp32_path, int8_path = work / "model.onnx", work / int8_name(cfg.tag)
    log.info(
        "exporting %s (%s, %s) to ONNX opset %d (%s exporter)",
        ckpt_path,
        ckpt["mode"],
        ckpt["arch"]["name"],
        cfg.opset,
        cfg.exporter,
    )
    export_onnx(deployed, fp32_path, data_cfg.image_size, cfg.opset, cfg.exporter)
    fp32 = q.session(fp32_path, cfg.threads)

    # FP32 check on a real test batch: ONNX Runtime vs the trained (un-folded) PyTorch model
    x_check, _ = next(iter(bundle.test.epoch(0)))
    x_check = x_check[:64]
    with torch.no_grad():
        reference = model(x_check)
        fused_diff = rel_diff(deployed(x_check), reference)
    onnx_diff = rel_diff(q.run_session(fp32, x_check), reference)
    if not onnx_diff <= MAX_REL_DIFF:
        raise OnnxMismatchError(
            f"ONNX Runtime's FP32 logits differ from PyTorch's by {onnx_diff:.2e} (max relative; "
            f"bound {MAX_REL_DIFF:.0e}); nothing was written. Try exporter=torchscript opset=17"
        )
    log.info("ONNX FP32 vs PyTorch: max rel diff %.2e (fold alone %.2e)", onnx_diff, fused_diff)
    fp32_record = {"bytes": fp32_path.stat().st_size, "sha256": sha256_file(fp32_path)}
    keep_fp32 = _place_fp32(run_dir / "model.onnx", fp32_record["sha256"], cfg.tag)  # refuses before calibrating

    log.info(
        "calibrating on %d training images (evaluation transform), %s activations / %s weights, per_channel=%s, reduce_range=%s",
        min(cfg.calibration_images, bundle.train.num_samples),
        settings.activation_type,
        settings.weight_type,
        settings.per_channel,
        settings.reduce_range,
    )
    calibrated = q.quantize(
        fp32_path, int8_path, calibration_batches(bundle, cfg.calibration_images, cfg.calibration_batch), settings, work
    )
    int8 = q.session(int8_path, cfg.threads)
    nodes = qdq_node_types(int8_path, "the quantized model")

    log.info("evaluating FP32 and INT8 on %d test images", bundle.test.num_samples)
    acc = q.evaluate({"fp32": fp32, "int8": int8}, bundle.test.epoch(0), bundle.num_classes)
    latency = {
        name: q.latency_table(sess, x_check, cfg.latency_runs, cfg.latency_warmup)
        for name, sess in (("fp32", fp32), ("int8", int8))
    }
    layers = layer_stats(deployed)
    import onnx

    result = QuantResult(
        model=ckpt["mode"],
        arch=ckpt["arch"],
        dataset=bundle.name,
        num_classes=bundle.num_classes,
        image_size=data_cfg.image_size,
        checkpoint=str(ckpt_path),
        trained_epochs=(ckpt.get("run") or {}).get("epoch"),
        fp32_top1=acc["fp32_top1"],
        fp32_top5=acc["fp32_top5"],
        int8_top1=acc["int8_top1"],
        int8_top5=acc["int8_top5"],
        top1_drop=acc["fp32_top1"] - acc["int8_top1"],
        top5_drop=acc["fp32_top5"] - acc["int8_top5"],
        top5_k=acc["top5_k"],
        int8_fp32_agreement=acc["agreement"],
        calibration_images=calibrated,
        eval_images=acc["images"],
        onnx_fp32_max_rel_diff=onnx_diff,
        fused_max_rel_diff=fused_diff,
        latency_ms_per_image=latency,
        latency_runs=cfg.latency_runs,
        layers=layers,
        layer_summary=summarize_layers(layers),
        opset=onnx_opset(fp32_path),
        exporter=cfg.exporter,
        quantization={
            **settings.to_dict(),
            "calibration_batch": cfg.calibration_batch,
            "calibration_split": "train (evaluation transform, evenly spaced)",
            "preprocessed": True,
        },
        int8_node_types=nodes,
        files={
            "model.onnx": fp32_record,
            int8_path.name: {"bytes": int8_path.stat().st_size, "sha256": sha256_file(int8_path)},
        },
        tag=cfg.tag,
        versions={"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__},
        cpu=cpu_name(),
        threads=cfg.threads,
        created=created_now(),
    )
    # every check passed: move the files into the run directory (each rename is atomic), quant.json last
    if not keep_fp32:
        os.replace(fp32_path, run_dir / "model.onnx")
    os.replace(int8_path, run_dir / int8_path.name)
    write_json(run_dir / quant_name(cfg.tag), to_dict(result))  # the fields, in order, are the file's keys
    log.info("export result:\n%s", format_table(result))  # logged, not printed: the step's export.log keeps it too
    return result


def _place_fp32(path: Path, sha256: str, tag: str) -> bool:
    """Whether the run's ``model.onnx`` is already this export's FP32 file (same sha256: left as it is,
    so a tagged export changes nothing the untagged one wrote). The torchscript export is byte-for-byte
    deterministic, so another file means another checkpoint, opset or exporter: the untagged export
    replaces it (as before), a tagged one is refused, since every quant*.json of the run must describe
    the one model.onnx there."""
    if not path.is_file():
        return False
    if sha256_file(path) == sha256:
        return True
    if tag:
        raise ConfigError(
            f"tag={tag}: {path} differs from this export's FP32 model (other checkpoint, opset or "
            f"exporter); the tagged files share model.onnx with quant.json, so use the settings that "
            f"wrote it, or export untagged. Nothing was written"
        )
    return False


def format_table(r: QuantResult) -> str:
    lat = r.latency_ms_per_image
    lines = [
        (f"{r.model} {r.arch['name']} on {r.dataset}: {r.eval_images} test images, {r.calibration_images} calibration images"),
        f"{'':<6} {'top-1':>7} {'top-5':>7} {'ms/img b1':>10} {'ms/img b32':>11}",
    ]
    for name, top1, top5 in (("fp32", r.fp32_top1, r.fp32_top5), ("int8", r.int8_top1, r.int8_top5)):
        lines.append(f"{name:<6} {top1:>7.2f} {top5:>7.2f} {lat[name]['batch1']:>10.3f} {lat[name]['batch32']:>11.3f}")
    s = r.layer_summary
    lines.append(
        f"top-1 drop {r.top1_drop:.2f} points; ONNX fp32 max rel diff {r.onnx_fp32_max_rel_diff:.1e}; "
        f"conv abs-max/std median {s['conv_absmax_over_std_median']:.1f}, max {s['conv_absmax_over_std_max']:.1f} "
        f"({s['conv_absmax_over_std_worst_layer']})"
    )
    return "\n".join(lines)
