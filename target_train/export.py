"""``python -m target_train.export run=<stage-two run dir>`` (console script ``repopt-export``).

Deployment check of a trained stage-two run (``model=target`` or the baseline, ``repvgg`` / ``rep``):

1. load ``best.pt`` (or ``last.pt``) safely, rebuild the model and fold it into the plain
   conv+ReLU network (``fuse``, the family's folding);
2. export ``model.onnx`` (dynamic batch axis) and check ONNX Runtime's FP32 logits against
   PyTorch's on a real test batch (max relative difference <= 1e-4, else ``OnnxMismatchError``);
3. static INT8 post-training quantization with ONNX Runtime (QDQ, per-channel int8 weights),
   calibrated on ``calibration_images`` training images under the evaluation transform
   (no augmentation), written as ``model.int8.onnx``;
4. FP32 and INT8 top-1/top-5 on the run's test set, latency per image at batch 1 and 32, and
   per-layer weight statistics of the folded convs (abs-max / std: how long-tailed the kernel
   is, which is what makes per-tensor/per-channel int8 lose precision).

Results go to ``quant.json`` in the run directory. Every file is produced in a scratch folder
first and moved into place only after all checks passed, so a failure leaves the run directory
as it was. Hydra's own logs go to ``<run>/export_logs``.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset

from repopt.app import run_guarded
from repopt.config import DataConfig, register_schema, to_typed
from repopt.data import build_data
from repopt.engine import load_checkpoint
from repopt.errors import CheckpointError, ConfigError, DataError, RepOptError
from repopt.family import build_model, family_of, spec_from_dict
from repopt.host import cpu_name
from repopt.io import sha256_file, write_json
from repopt.numerics import rel_diff

from . import quantize as q
from .deploy import MAX_REL_DIFF
from .handler import fuse

log = logging.getLogger("target_train.export")

EXPORTERS = ("torchscript", "dynamo")


class ExportError(RepOptError, RuntimeError):
    """The exported or quantized model is not usable (wrong numbers, exporter failure)."""


class OnnxMismatchError(ExportError):
    """ONNX Runtime's FP32 logits differ from PyTorch's by more than the bound."""


@dataclass
class ExportConfig:
    run: Optional[str] = None  # the stage-two run directory (required)
    checkpoint: str = "best"  # best | last (best falls back to last when the run has no best.pt)
    opset: int = 17
    exporter: str = "torchscript"  # torchscript (exact opset, fast) | dynamo (torch.export based, opset >= 18)
    calibration_images: int = 512  # training images, evaluation transform
    calibration_batch: int = 32
    calibration_method: str = "minmax"  # minmax | entropy | percentile
    eval_images: Optional[int] = None  # null = the whole test set
    latency_runs: int = 20
    latency_warmup: int = 3
    data_root: Optional[str] = None  # override the data root stored in the run's config
    per_channel: bool = True
    activation_type: str = "auto"  # auto (uint8 on x86-64, int8 on ARM) | uint8 | int8
    reduce_range: Optional[bool] = None  # null: true on x86-64 without VNNI, else false
    threads: Optional[int] = None  # ONNX Runtime intra-op threads; null = its default


register_schema("export_schema", ExportConfig)


def run_log_dir(run, folder: str = "export_logs") -> str:
    """Hydra's output folder for a step on a finished run: ``<run>/<folder>`` when the run exists and
    is writable, else a temp folder (so a mistyped ``run=`` does not create a directory)."""
    if run not in (None, "") and os.path.isdir(os.path.expanduser(str(run))) and os.access(os.path.expanduser(str(run)), os.W_OK):
        return os.path.join(os.path.expanduser(str(run)), folder)
    return os.path.join(tempfile.gettempdir(), f"repopt-{folder.replace('_', '-')}")


OmegaConf.register_new_resolver("repopt_export_logs", run_log_dir, replace=True)


# ---------------------------------------------------------------------------- inputs
def validate(cfg: ExportConfig) -> None:
    if cfg.run in (None, ""):
        raise ConfigError("run= is required: pass the stage-two run directory, e.g. run=outputs/target_train/<date>/<time>")
    if cfg.checkpoint not in ("best", "last"):
        raise ConfigError(f"checkpoint={cfg.checkpoint!r}: choose best or last")
    if cfg.exporter not in EXPORTERS:
        raise ConfigError(f"exporter={cfg.exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if cfg.opset < 17:
        raise ConfigError(f"opset={cfg.opset}: the export needs opset 17 or newer")
    if cfg.exporter == "dynamo" and cfg.opset < 18:
        raise ConfigError(f"exporter=dynamo writes opset 18 or newer (got opset={cfg.opset}); use opset=18 or exporter=torchscript")
    for key in ("calibration_images", "calibration_batch", "latency_runs"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1 (got {getattr(cfg, key)})")
    if cfg.latency_warmup < 0:
        raise ConfigError(f"latency_warmup must be >= 0 (got {cfg.latency_warmup})")
    if cfg.eval_images is not None and cfg.eval_images < 1:
        raise ConfigError(f"eval_images must be a positive number or null for the whole test set (got {cfg.eval_images})")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads must be a positive number or null (got {cfg.threads})")


def find_run(cfg) -> tuple[Path, Path]:
    """The run directory and the checkpoint file in it."""
    run_dir = Path(os.path.expanduser(cfg.run)).resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist; pass run=<the stage-two run directory> "
                          f"(the folder with best.pt / last.pt written by python -m target_train)")
    best, last = run_dir / "best.pt", run_dir / "last.pt"
    if cfg.checkpoint == "best" and best.is_file():
        return run_dir, best
    if last.is_file():
        if cfg.checkpoint == "best":
            log.warning("%s has no best.pt: exporting last.pt", run_dir)
        return run_dir, last
    raise CheckpointError(f"{run_dir} holds no checkpoint (no {'best.pt or ' if cfg.checkpoint == 'best' else ''}last.pt); "
                          f"point run= at a finished stage-two run directory (python -m target_train ...)")


def load_model(path: Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the trained model of a stage-two checkpoint, in eval mode on the CPU."""
    ckpt = load_checkpoint(path, map_location="cpu")
    stage = ckpt.get("stage")
    if stage == "hypersearch":
        raise CheckpointError(
            f"{path} is a stage-one (hypersearch) checkpoint: it trains the scales, not the deployable model. "
            f"Train stage two with those scales first (python -m target_train scales={path.parent}), "
            f"then export that run: run=<the stage-two run directory>"
        )
    mode = ckpt.get("mode")
    for key in ("arch", "num_classes"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: the checkpoint has no {key!r} entry; it was not written by python -m target_train")
    try:
        arch = spec_from_dict(ckpt["arch"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    baseline = family_of(arch).baseline_mode
    if stage not in (None, "target_train") or mode not in ("target", baseline):
        raise CheckpointError(f"{path}: not a stage-two checkpoint (stage={stage!r}, mode={mode!r}); "
                              f"point run= at a run of python -m target_train (model=target or model={baseline})")
    try:
        model = build_model(arch, int(ckpt["num_classes"]), mode)
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: the weights do not fit the recorded architecture ({str(exc)[:300]})") from None
    return model.eval(), ckpt


def stored_config(ckpt: dict, run_dir: Path) -> dict:
    """The stage-two run's training config: the checkpoint's copy, else ``.hydra/config.yaml``."""
    stored = ckpt.get("config")
    if not isinstance(stored, dict) or "data" not in stored:
        hydra_cfg = run_dir / ".hydra" / "config.yaml"
        if not hydra_cfg.is_file():
            raise CheckpointError(f"neither the checkpoint nor {hydra_cfg} records the run's data configuration")
        stored = OmegaConf.to_container(OmegaConf.load(hydra_cfg), resolve=True)
    return stored


def data_config(ckpt: dict, run_dir: Path, cfg) -> tuple[DataConfig, int]:
    """The run's DataConfig (from the checkpoint, else .hydra/config.yaml) with the step's overrides
    (``cfg.data_root``, ``cfg.eval_images``: an ExportConfig or a PruneConfig)."""
    stored = stored_config(ckpt, run_dir)
    data = to_typed(stored["data"], DataConfig)
    if cfg.data_root is not None:
        data.root = cfg.data_root
    if cfg.eval_images is not None:
        data.test_subset = min(cfg.eval_images, data.test_subset or cfg.eval_images)
    data.download = False  # never fetch anything during an export
    return data, int(stored.get("seed", 0))


def load_data(data_cfg: DataConfig, seed: int, cfg):
    try:
        return build_data(data_cfg, "cpu", seed=seed)
    except DataError as exc:
        hint = "" if cfg.data_root else " (if the data moved since training, pass data_root=<its new folder>)"
        raise DataError(f"{exc}{hint}") from None


def calibration_batches(bundle, n: int, batch: int) -> Iterator[torch.Tensor]:
    """``n`` training images, evenly spread over the (un-shuffled) training split, through the
    *evaluation* transform: no crop, no flip; normalized with the bundle's mean/std."""
    from repopt.data.loader_batches import LoaderBatches
    from repopt.data.tensor_batches import TensorBatches

    train, test = bundle.train, bundle.test
    total = int(train.num_samples)
    n = min(n, total)
    idx = (torch.arange(n, dtype=torch.int64) * total) // n  # evenly spaced: every class of a folder tree
    if isinstance(train, TensorBatches):
        stream = TensorBatches(train.images.index_select(0, idx), train.labels.index_select(0, idx), torch.device("cpu"),
                               batch_size=batch, mean=bundle.mean, std=bundle.std, augment=False, drop_last=False,
                               out_size=test.out_size)
    elif isinstance(train, LoaderBatches) and isinstance(test, LoaderBatches):
        base = train.loader.dataset.base
        stream = LoaderBatches(Subset(base, idx.tolist()), test.loader.dataset.transform, torch.device("cpu"),
                               batch_size=batch, mean=bundle.mean, std=bundle.std, train=False, drop_last=False,
                               num_workers=0)
    else:  # pragma: no cover - a new loader type
        raise ConfigError(f"cannot draw un-augmented training images from a {type(train).__name__}")
    for x, _ in stream.epoch(0):
        yield x


# ---------------------------------------------------------------------------- export
def export_onnx(model: torch.nn.Module, path: Path, image_size: int, opset: int, exporter: str) -> None:
    """Write the (folded) model as ONNX with a dynamic batch axis; deterministic for a given torch."""
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        if exporter == "torchscript":
            kwargs = {}
            if "dynamo" in inspect.signature(torch.onnx.export).parameters:
                kwargs["dynamo"] = False
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
                torch.onnx.export(model, (x,), str(path), opset_version=opset, input_names=[q.INPUT_NAME],
                                  output_names=[q.OUTPUT_NAME], do_constant_folding=True, export_params=True,
                                  dynamic_axes={q.INPUT_NAME: {0: "batch"}, q.OUTPUT_NAME: {0: "batch"}}, **kwargs)
        else:
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=[q.INPUT_NAME],
                                        output_names=[q.OUTPUT_NAME], dynamic_shapes=({0: batch},), verbose=False)
            program.save(str(path), external_data=False)
    except Exception as exc:  # the exporters raise many types; name the setting to change
        raise ExportError(f"torch.onnx.export (exporter={exporter}, opset={opset}) failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300] if str(exc) else ''}; try opset=17 exporter=torchscript") from None
    import onnx

    onnx.checker.check_model(str(path))


def onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def node_types(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------- weight statistics
@torch.no_grad()
def layer_stats(deployed: torch.nn.Module) -> list[dict]:
    """Weight statistics of every folded conv (and the linear head), in network order.

    A layer is named by its block (``stage1.0``; a conv inside a block keeps its path) and its
    kind says the kernel: ``conv3x3``, ``conv1x1``, ``dw3x3`` (depthwise), ``linear``.

    ``absmax_over_std`` = max|W| / std(W) over the whole tensor: a per-tensor int8 grid spends its
    255 steps on [-max|W|, max|W|], so the larger this ratio, the fewer steps the bulk of the weights
    gets. ``channel_absmax_over_std_max`` is the same ratio for the worst output channel, which is
    what per-channel quantization faces.
    """
    rows = []
    layers = []
    for name, module in deployed.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0]
            kind = f"dw{k}x{k}" if module.groups > 1 and module.groups == module.in_channels else f"conv{k}x{k}"
            layers.append((name.removesuffix(".conv"), kind, module, module.stride[0]))
        elif isinstance(module, torch.nn.Linear):
            layers.append((name, "linear", module, None))
    for name, kind, module, stride in layers:
        w = module.weight.detach().double()
        flat = w.reshape(w.shape[0], -1)
        std = float(w.std())
        absmax = float(w.abs().max())
        ch_std = flat.std(dim=1).clamp_min(1e-12)
        ch_ratio = flat.abs().amax(dim=1) / ch_std
        rows.append({
            "name": name,
            "kind": kind,
            "out_channels": int(w.shape[0]),
            "in_channels": int(w.shape[1]),
            "stride": stride,
            "weight_min": float(w.min()),
            "weight_max": float(w.max()),
            "weight_absmax": absmax,
            "weight_std": std,
            "absmax_over_std": absmax / std if std > 0 else math.inf,
            "channel_absmax_over_std_max": float(ch_ratio.max()),
            "channel_absmax_over_std_median": float(ch_ratio.median()),
            "bias_absmax": float(module.bias.detach().abs().max()) if module.bias is not None else None,
        })
    return rows


def summarize_layers(rows: list[dict]) -> dict:
    convs = [r["absmax_over_std"] for r in rows if r["kind"] != "linear"]
    worst = max((r for r in rows if r["kind"] != "linear"), key=lambda r: r["absmax_over_std"])
    t = torch.tensor(convs, dtype=torch.float64)
    return {"conv_absmax_over_std_median": float(t.median()), "conv_absmax_over_std_mean": float(t.mean()),
            "conv_absmax_over_std_max": float(t.max()), "conv_absmax_over_std_worst_layer": worst["name"]}


# ---------------------------------------------------------------------------- the app
def export_run(cfg: ExportConfig) -> dict:
    validate(cfg)
    ort = q.require_onnxruntime()
    run_dir, ckpt_path = find_run(cfg)
    model, ckpt = load_model(ckpt_path)
    settings = q.choose_settings(cfg.activation_type, cfg.reduce_range, cfg.per_channel, cfg.calibration_method)
    data_cfg, seed = data_config(ckpt, run_dir, cfg)
    bundle = load_data(data_cfg, seed, cfg)
    if bundle.num_classes != int(ckpt["num_classes"]):
        raise DataError(f"the data has {bundle.num_classes} classes but the checkpoint {ckpt['num_classes']}; "
                        f"data_root={data_cfg.root} is not the data set the run was trained on")
    deployed = fuse(model)
    try:
        work = Path(tempfile.mkdtemp(prefix=".export-", dir=run_dir))
    except OSError as exc:
        raise ConfigError(f"run directory {run_dir} is not writable ({exc.strerror}); copy the run somewhere writable") from None
    try:
        return _export_in(work, cfg, run_dir, ckpt_path, model, deployed, ckpt, bundle, data_cfg, settings, ort)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _export_in(work: Path, cfg: ExportConfig, run_dir: Path, ckpt_path: Path, model, deployed, ckpt, bundle,
               data_cfg: DataConfig, settings: q.QuantSettings, ort) -> dict:
    fp32_path, int8_path = work / "model.onnx", work / "model.int8.onnx"
    log.info("exporting %s (%s, %s) to ONNX opset %d (%s exporter)", ckpt_path, ckpt["mode"], ckpt["arch"]["name"],
             cfg.opset, cfg.exporter)
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
        raise OnnxMismatchError(f"ONNX Runtime's FP32 logits differ from PyTorch's by {onnx_diff:.2e} (max relative; "
                                f"bound {MAX_REL_DIFF:.0e}); nothing was written. Try exporter=torchscript opset=17")
    log.info("ONNX FP32 vs PyTorch: max rel diff %.2e (fold alone %.2e)", onnx_diff, fused_diff)

    log.info("calibrating on %d training images (evaluation transform), %s activations / %s weights, per_channel=%s, "
             "reduce_range=%s", min(cfg.calibration_images, bundle.train.num_samples), settings.activation_type,
             settings.weight_type, settings.per_channel, settings.reduce_range)
    calibrated = q.quantize(fp32_path, int8_path, calibration_batches(bundle, cfg.calibration_images, cfg.calibration_batch),
                            settings, work)
    int8 = q.session(int8_path, cfg.threads)
    nodes = node_types(int8_path)
    if not nodes.get("QuantizeLinear") or not nodes.get("DequantizeLinear"):
        raise ExportError(f"the quantized model has no QuantizeLinear/DequantizeLinear nodes ({nodes})")

    log.info("evaluating FP32 and INT8 on %d test images", bundle.test.num_samples)
    acc = q.evaluate({"fp32": fp32, "int8": int8}, bundle.test.epoch(0), bundle.num_classes)
    latency = {name: q.latency_table(sess, x_check, cfg.latency_runs, cfg.latency_warmup)
               for name, sess in (("fp32", fp32), ("int8", int8))}
    layers = layer_stats(deployed)
    import onnx

    result = {
        "model": ckpt["mode"],
        "arch": ckpt["arch"],
        "dataset": bundle.name,
        "num_classes": bundle.num_classes,
        "image_size": data_cfg.image_size,
        "checkpoint": str(ckpt_path),
        "trained_epochs": (ckpt.get("run") or {}).get("epoch"),
        "fp32_top1": acc["fp32_top1"],
        "fp32_top5": acc["fp32_top5"],
        "int8_top1": acc["int8_top1"],
        "int8_top5": acc["int8_top5"],
        "top1_drop": acc["fp32_top1"] - acc["int8_top1"],
        "top5_drop": acc["fp32_top5"] - acc["int8_top5"],
        "top5_k": acc["top5_k"],
        "int8_fp32_agreement": acc["agreement"],
        "calibration_images": calibrated,
        "eval_images": acc["images"],
        "onnx_fp32_max_rel_diff": onnx_diff,
        "fused_max_rel_diff": fused_diff,
        "latency_ms_per_image": latency,
        "latency_runs": cfg.latency_runs,
        "layers": layers,
        "layer_summary": summarize_layers(layers),
        "opset": onnx_opset(fp32_path),
        "exporter": cfg.exporter,
        "quantization": {**settings.to_dict(), "calibration_batch": cfg.calibration_batch,
                         "calibration_split": "train (evaluation transform, evenly spaced)", "preprocessed": True},
        "int8_node_types": nodes,
        "files": {
            "model.onnx": {"bytes": fp32_path.stat().st_size, "sha256": sha256_file(fp32_path)},
            "model.int8.onnx": {"bytes": int8_path.stat().st_size, "sha256": sha256_file(int8_path)},
        },
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__},
        "cpu": cpu_name(),
        "threads": cfg.threads,
        "created": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
    }
    # every check passed: move the files into the run directory (each rename is atomic), quant.json last
    os.replace(fp32_path, run_dir / "model.onnx")
    os.replace(int8_path, run_dir / "model.int8.onnx")
    write_json(run_dir / "quant.json", result)
    print(format_table(result))
    return result


def format_table(r: dict) -> str:
    lat = r["latency_ms_per_image"]
    lines = [
        (f"{r['model']} {r['arch']['name']} on {r['dataset']}: {r['eval_images']} test images, "
         f"{r['calibration_images']} calibration images"),
        f"{'':<6} {'top-1':>7} {'top-5':>7} {'ms/img b1':>10} {'ms/img b32':>11}",
    ]
    for name in ("fp32", "int8"):
        lines.append(f"{name:<6} {r[f'{name}_top1']:>7.2f} {r[f'{name}_top5']:>7.2f} "
                     f"{lat[name]['batch1']:>10.3f} {lat[name]['batch32']:>11.3f}")
    s = r["layer_summary"]
    lines.append(f"top-1 drop {r['top1_drop']:.2f} points; ONNX fp32 max rel diff {r['onnx_fp32_max_rel_diff']:.1e}; "
                 f"conv abs-max/std median {s['conv_absmax_over_std_median']:.1f}, max {s['conv_absmax_over_std_max']:.1f} "
                 f"({s['conv_absmax_over_std_worst_layer']})")
    return "\n".join(lines)


def run_export_app(cfg: DictConfig) -> dict | None:
    """The project's command-line conventions: bad input -> one clear line and exit code 1."""
    return run_guarded(lambda: export_run(to_typed(cfg, ExportConfig)))


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="export")
def main(cfg: DictConfig):
    return run_export_app(cfg)


if __name__ == "__main__":
    main()
