"""The schemas of the steps on a finished stage-two run (``target_train.export``, ``.prune``, ``.qat``),
their checks, their INT8 defaults and where Hydra writes their logs.

No torch here: every app checks its settings before torch loads, so a misspelt value is reported
at once. The steps themselves are ``exporter.py``, ``pruner.py`` and ``qat_trainer.py``.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Optional

from omegaconf import OmegaConf

from repopt.config import register_schema, require
from repopt.errors import ConfigError


# ---------------------------------------------------------------------------- Hydra's output folder
def run_log_dir(run, folder: str = "export_logs") -> str:
    """Hydra's output folder for a step on a finished run: ``<run>/<folder>`` when the run exists and
    is writable, else a temp folder (so a mistyped ``run=`` does not create a directory)."""
    if run not in (None, "") and os.path.isdir(os.path.expanduser(str(run))) and os.access(os.path.expanduser(str(run)), os.W_OK):
        return os.path.join(os.path.expanduser(str(run)), folder)
    return os.path.join(tempfile.gettempdir(), f"repopt-{folder.replace('_', '-')}")


# the Hydra output folders of the three steps (conf/export.yaml, conf/prune.yaml, conf/qat.yaml)
OmegaConf.register_new_resolver("repopt_export_logs", run_log_dir, replace=True)
OmegaConf.register_new_resolver("repopt_prune_logs", lambda run: run_log_dir(run, "prune_logs"), replace=True)
OmegaConf.register_new_resolver("repopt_qat_logs", lambda run: run_log_dir(run, "qat_logs"), replace=True)


# ---------------------------------------------------------------------------- the run every step reads
CHECKPOINTS = ("best", "last")  # best falls back to last when the run has no best.pt


def require_run(run: Optional[str]) -> None:
    if run in (None, ""):
        raise ConfigError("run= is required: pass the stage-two run directory, e.g. run=outputs/target_train/<date>/<time>")


# ---------------------------------------------------------------------------- INT8, shared by export and QAT
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("auto", "uint8", "int8")
# The INT8 scheme every step uses unless told otherwise (export's settings default to these; prune's
# optional INT8 uses them as they are).
ACTIVATION_TYPE = "auto"
REDUCE_RANGE: Optional[bool] = None
PER_CHANNEL = True
CALIBRATION_METHOD = "minmax"
CALIBRATION_BATCH = 32


def check_int8_step(cfg) -> None:
    """The settings every INT8 step (export, QAT) shares: calibration, evaluation subset, latency, threads,
    the INT8 scheme's names (``quantize.choose_settings`` checks them again where they are used)."""
    for key in ("calibration_images", "calibration_batch", "latency_runs"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1 (got {getattr(cfg, key)})")
    if cfg.latency_warmup < 0:
        raise ConfigError(f"latency_warmup must be >= 0 (got {cfg.latency_warmup})")
    if cfg.eval_images is not None and cfg.eval_images < 1:
        raise ConfigError(f"eval_images must be a positive number or null for the whole test set (got {cfg.eval_images})")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads must be a positive number or null (got {cfg.threads})")
    if cfg.activation_type not in ACTIVATION_TYPES:
        raise ConfigError(f"activation_type={cfg.activation_type!r}: choose one of {', '.join(ACTIVATION_TYPES)}")
    method = getattr(cfg, "calibration_method", CALIBRATION_METHOD)  # QAT calibrates its observers by min/max
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration_method={method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")


# ---------------------------------------------------------------------------- export
EXPORTERS = ("torchscript", "dynamo")  # torch.onnx's two exporters (onnx_io.export_onnx)
TAG_PATTERN = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class ExportConfig:
    run: Optional[str] = None  # the stage-two run directory (required)
    checkpoint: str = "best"  # best | last (best falls back to last when the run has no best.pt)
    opset: int = 17  # ONNX opset of model.onnx
    exporter: str = "torchscript"  # torchscript (exact opset, fast) | dynamo (torch.export based, opset >= 18)
    calibration_images: int = 512  # training images, evaluation transform
    calibration_batch: int = CALIBRATION_BATCH  # images per calibration batch
    calibration_method: str = CALIBRATION_METHOD  # minmax | entropy | percentile
    eval_images: Optional[int] = None  # null = the whole test set
    latency_runs: int = 20  # latency: median over this many timed runs ...
    latency_warmup: int = 3  # ... after this many untimed ones
    data_root: Optional[str] = None  # override the data root stored in the run's config
    per_channel: bool = PER_CHANNEL  # int8 weights: one scale per output channel; false: one per tensor
    activation_type: str = ACTIVATION_TYPE  # auto (uint8 on x86-64, int8 on ARM) | uint8 | int8
    reduce_range: Optional[bool] = REDUCE_RANGE  # null: true on x86-64 without VNNI, else false
    threads: Optional[int] = None  # ONNX Runtime intra-op threads; null = its default
    # appended to the file names so that several PTQ settings of one run sit side by side:
    # model.int8-<tag>.onnx, quant-<tag>.json; "" = model.int8.onnx, quant.json. model.onnx is shared
    tag: str = ""


register_schema("export_schema", ExportConfig)


def validate_export(cfg: ExportConfig) -> None:
    require_run(cfg.run)
    if cfg.checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint={cfg.checkpoint!r}: choose best or last")
    if cfg.exporter not in EXPORTERS:
        raise ConfigError(f"exporter={cfg.exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if cfg.opset < 17:
        raise ConfigError(f"opset={cfg.opset}: the export needs opset 17 or newer")
    if cfg.exporter == "dynamo" and cfg.opset < 18:
        raise ConfigError(
            f"exporter=dynamo writes opset 18 or newer (got opset={cfg.opset}); use opset=18 or exporter=torchscript"
        )
    check_int8_step(cfg)
    if cfg.tag and not TAG_PATTERN.fullmatch(cfg.tag):  # it becomes part of file names: no paths, no spaces
        raise ConfigError(f"tag={cfg.tag!r}: use letters, digits, _ and - only (it is appended to the file names)")


# ---------------------------------------------------------------------------- prune
IMPORTANCES = ("l2", "bn_scale")  # group L2 magnitude | BN scale |gamma| (needs BN layers: not the deploy form)
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
        if need_run:
            require_run(self.run)
        k = lambda key: prefix + key  # noqa: E731
        require(self.checkpoint in CHECKPOINTS, k("checkpoint"), self.checkpoint, "best or last")
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


# ---------------------------------------------------------------------------- QAT
DEFAULT_LR_PER_256 = 1e-3  # lr: null -> 1e-3 x batch / 256 (a hundredth of SGD's usual 0.1 per 256)


@dataclass
class QatConfig:
    run: Optional[str] = None  # the stage-two run directory (required)
    checkpoint: str = "best"  # best | last (best falls back to last when the run has no best.pt)
    epochs: int = 2  # QAT epochs over the run's training split (0: observers calibrated, no training)
    lr: Optional[float] = None  # peak SGD learning rate; null = 1e-3 x batch / 256
    momentum: float = 0.9  # SGD, no weight decay (a short fine-tune: decay would only shrink the folded kernels)
    # masks=true multiplies each folded conv kernel's gradient by the run's RepOpt-VGG mask carried through
    # the BN fold, t^2 * M (t = gamma / sqrt(var + eps)): exactly the RepOptimizer's step on the trained
    # kernel with its BN frozen (folded_masks). Default false: it must work on every stage-two run (the
    # baselines and scales=none runs have no masks), and a short plain-SGD fine-tune at 1/100 of the
    # training lr from trained weights is the standard QAT recipe.
    masks: bool = False
    per_channel: bool = PER_CHANNEL  # int8 weights: one scale per output channel; false: one per tensor
    activation_type: str = ACTIVATION_TYPE  # auto (uint8 on x86-64, int8 on ARM) | uint8 | int8
    reduce_range: Optional[bool] = REDUCE_RANGE  # null: true on x86-64 without VNNI, else false
    calibration_images: int = 512  # un-augmented training images that initialize the observers' ranges
    calibration_batch: int = CALIBRATION_BATCH  # images per calibration batch
    eval_images: Optional[int] = None  # null = the whole test set
    latency_runs: int = 20  # latency: median over this many timed runs ...
    latency_warmup: int = 3  # ... after this many untimed ones
    opset: int = 18  # the dynamo exporter writes opset 18 or newer
    data_root: Optional[str] = None  # override the data root stored in the run's config
    threads: Optional[int] = None  # ONNX Runtime intra-op threads; null = its default


register_schema("qat_schema", QatConfig)


def validate_qat(cfg: QatConfig) -> None:
    require_run(cfg.run)
    if cfg.checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint={cfg.checkpoint!r}: choose best or last")
    if cfg.epochs < 0:
        raise ConfigError(f"epochs must be >= 0 (got {cfg.epochs}); 0 only calibrates the observers")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"lr must be a positive number or null for 1e-3 x batch / 256 (got {cfg.lr})")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1) (got {cfg.momentum})")
    if cfg.opset < 18:
        raise ConfigError(
            f"opset={cfg.opset}: the QAT model is exported by torch.onnx's dynamo exporter, which writes opset 18 or newer"
        )
    check_int8_step(cfg)
