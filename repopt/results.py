"""Typed run results: what ``metrics.json`` holds, for a stage run and for a pipeline job.

The trainer and the apps write these dataclasses and ``pipelines.compare`` reads them back
through the same types, so a field has one name everywhere and a misspelt key is an error
when it is written, not a silently empty column when it is read.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import DivergenceError, Interrupted
from .io import read_json, write_json


class Status(str, Enum):
    """How a run ended (``running`` while it is under way)."""

    RUNNING = "running"
    COMPLETED = "completed"
    DIVERGED = "diverged"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    PRUNED = "pruned"  # ended early by a search driver's pruner (pipelines.tune); what it trained is kept

    def __str__(self) -> str:
        return self.value


def status_of(exc: BaseException) -> Status:
    """The status a run's result records for the error that ended it."""
    if isinstance(exc, DivergenceError):
        return Status.DIVERGED
    if isinstance(exc, Interrupted):
        return Status.INTERRUPTED
    return Status.FAILED


# A result that says one of these is the precise outcome; a later generic failure must not overwrite it.
FINAL = (Status.COMPLETED, Status.DIVERGED, Status.INTERRUPTED, Status.PRUNED)


@dataclass
class ChannelPruning:
    """The channel-pruning step's record (``python -m target_train.prune``), ``StageMetrics.channel_pruning``.

    "Pruning" is the channel step throughout; "pruned" alone is ``Status.PRUNED`` (an Optuna trial)
    or a file of this step (``pruned.pt``, the latency key ``"pruned"``). Every field is optional so
    that a record written by another version reads back (missing keys stay None)."""

    params_before: Optional[int] = None  # parameters of the deployed (folded) unpruned model
    params_after: Optional[int] = None  # ... and of the deployed pruned model
    params_ratio: Optional[float] = None  # params_after / params_before
    macs_before: Optional[int] = None  # multiply-accumulates per image of the deployed unpruned model
    macs_after: Optional[int] = None  # ... and of the deployed pruned model
    macs_ratio: Optional[float] = None  # macs_after / macs_before
    # "unpruned"/"pruned" (file names of this step's models) -> "batch1"/"batch32" -> ONNX Runtime ms per image
    latency_ms_per_image: Optional[dict[str, dict[str, float]]] = None
    speedup: Optional[dict[str, float]] = None  # "batch1"/"batch32" -> unpruned / pruned latency, timed side by side
    latency_runs: Optional[int] = None  # the median of this many timed runs
    threads: Optional[int] = None  # ONNX Runtime intra-op threads (None: its default)
    cpu: Optional[str] = None  # the CPU the latency was measured on
    onnx_fp32_max_rel_diff: Optional[float] = None  # pruned.onnx under ONNX Runtime vs PyTorch, max relative
    deploy_file: Optional[str] = None  # the torch.export program, relative to the result folder ("pruned.pt")
    deploy_max_rel_diff: Optional[float] = None  # that program vs the fine-tuned PyTorch model, max relative
    versions: Optional[dict[str, str]] = None  # torch and onnxruntime versions
    int8: Optional[dict[str, Any]] = None  # int8=true: calibration, FP32/INT8 top-1 of pruned.int8.onnx, the quant settings
    method: Optional[str] = None  # repopt | plain | repvgg-deploy | repvgg-branches | qarepvgg-deploy | qarepvgg-branches
    ratio: Optional[float] = None  # fraction of each layer's output channels removed
    importance: Optional[str] = None  # l2 | bn_scale
    round_to: Optional[int] = None  # kept widths rounded down to a multiple of this (None: exact)
    repvgg_mode: Optional[str] = None  # deploy | branches for RepVGG/QARepVGG runs; None for the target
    source_run: Optional[str] = None  # the stage-two run directory that was pruned
    checkpoint: Optional[str] = None  # the checkpoint file that was pruned
    top1_before: Optional[float] = None  # test top-1 (%) of the unpruned model
    top5_before: Optional[float] = None
    top1_pruned: Optional[float] = None  # right after pruning, before fine-tuning
    top5_pruned: Optional[float] = None
    top1_finetuned: Optional[float] = None  # after fine-tuning (= top1_pruned with epochs=0)
    top5_finetuned: Optional[float] = None
    widths_before: Optional[list[int]] = None  # output channels per prunable layer, in network order
    widths_after: Optional[list[int]] = None
    finetune: Optional[dict[str, Any]] = None  # epochs, lr, optimizer, device, max_steps_per_epoch of the fine-tune
    created: Optional[str] = None  # ISO time the record was written


def created_now() -> str:
    """The ``created`` field of a step's record: now, ISO 8601 to the second with the local UTC offset."""
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


# The result files of the steps on a finished stage-two run, named once for their writers and readers.
PER_TENSOR_TAG = "per_tensor"  # the pipeline's ptq_per_tensor step: quant-per_tensor.json, model.int8-per_tensor.onnx
QAT_RESULT = "qat.json"


def quant_name(tag: str = "") -> str:
    """The export step's result file for ``tag`` (``quant.json`` untagged)."""
    return f"quant-{tag}.json" if tag else "quant.json"


@dataclass
class QuantResult:
    """``quant.json`` (``quant-<tag>.json``) of the export step (``python -m target_train.export``):
    ``to_dict`` of it is the file, key for key, so older readers of the file see no change."""

    model: Optional[str] = None  # the run's mode: target | repvgg | qarepvgg | ...
    arch: Optional[dict[str, Any]] = None  # the architecture spec stored in the checkpoint
    dataset: Optional[str] = None
    num_classes: Optional[int] = None
    image_size: Optional[int] = None
    checkpoint: Optional[str] = None  # the checkpoint file that was exported
    trained_epochs: Optional[int] = None  # epochs the checkpoint had trained (None: not recorded)
    fp32_top1: Optional[float] = None  # ONNX Runtime FP32 test top-1 (%)
    fp32_top5: Optional[float] = None
    int8_top1: Optional[float] = None  # ONNX Runtime INT8 test top-1 (%)
    int8_top5: Optional[float] = None
    top1_drop: Optional[float] = None  # fp32_top1 - int8_top1
    top5_drop: Optional[float] = None
    top5_k: Optional[int] = None  # the k of "top-5" (fewer than 5 classes: their count)
    int8_fp32_agreement: Optional[float] = None  # fraction of test images where INT8 and FP32 predict the same class
    calibration_images: Optional[int] = None  # training images the INT8 ranges were calibrated on
    eval_images: Optional[int] = None  # test images evaluated
    onnx_fp32_max_rel_diff: Optional[float] = None  # model.onnx under ONNX Runtime vs the trained PyTorch model
    fused_max_rel_diff: Optional[float] = None  # the folded PyTorch model vs the trained one
    latency_ms_per_image: Optional[dict[str, dict[str, float]]] = None  # "fp32"/"int8" -> "batch1"/"batch32" -> ms
    latency_runs: Optional[int] = None  # the median of this many timed runs
    layers: Optional[list[dict[str, Any]]] = None  # weight statistics of every folded conv and the head
    layer_summary: Optional[dict[str, Any]] = None  # abs-max/std over the convs: median, max, worst layer
    opset: Optional[int] = None  # ONNX opset of model.onnx
    exporter: Optional[str] = None  # torchscript | dynamo
    quantization: Optional[dict[str, Any]] = None  # the INT8 scheme and calibration settings
    int8_node_types: Optional[dict[str, int]] = None  # op type -> count in the INT8 model
    files: Optional[dict[str, dict[str, Any]]] = None  # file name -> {bytes, sha256} of model.onnx and the INT8 model
    tag: Optional[str] = None  # "" for quant.json, else the X of quant-X.json
    versions: Optional[dict[str, str]] = None  # torch, onnxruntime, onnx versions
    cpu: Optional[str] = None  # the CPU the latency was measured on
    threads: Optional[int] = None  # ONNX Runtime intra-op threads (None: its default)
    created: Optional[str] = None  # ISO time the file was written


@dataclass
class StageMetrics:
    """``<run>/metrics.json`` of a stage-one or stage-two run."""

    status: Status = Status.RUNNING
    stage: Optional[str] = None  # hypersearch | target_train
    family: Optional[str] = None  # vgg | ghostnet
    arch: Optional[str] = None
    arch_spec: Optional[dict] = None  # the architecture's full spec (its to_dict())
    depth: Optional[int] = None  # conv layers of the plain network (its main path)
    dataset: Optional[str] = None
    top1: Optional[float] = None  # test top-1 (%) after the last finished epoch
    top5: Optional[float] = None
    loss: Optional[float] = None
    best_top1: Optional[float] = None
    epochs: int = 0  # finished epochs
    steps: int = 0
    wall_seconds: Optional[float] = None
    train_seconds: Optional[float] = None
    images_per_sec: Optional[float] = None
    device: Optional[str] = None
    world_size: int = 1
    peak_memory_gib: Optional[float] = None
    # with ema.enabled: which weights best.pt and deploy.pt (stage two) / the scales (stage one) hold,
    # "ema" or "model", and the EMA's test metrics after the last epoch (when it is evaluated)
    delivered: Optional[str] = None
    ema_top1: Optional[float] = None
    ema_top5: Optional[float] = None
    ema_loss: Optional[float] = None
    ema_best_top1: Optional[float] = None
    # stage one: the scales file it wrote
    scales_file: Optional[str] = None
    scales_sha256: Optional[str] = None
    # stage two: what it trained (``scales``: kind, path, sha256 and metadata of the file it read)
    model: Optional[str] = None
    optimizer: Optional[str] = None
    scales: Optional[dict] = None
    # the channel-pruning step (stage "prune", target_train.prune): ratio, widths, MACs, accuracy before/after, latency
    channel_pruning: Optional[ChannelPruning] = None
    deploy_file: Optional[str] = None
    deploy_max_rel_diff: Optional[float] = None
    # how it failed
    error: Optional[str] = None
    diverged_step: Optional[int] = None
    # the whole resolved config of the run, and (once completed) name -> {size, sha256} of every
    # artifact it promises (repopt/rundir.py): what "the same work" and "completed" are checked against
    config: Optional[dict] = None
    manifest: Optional[dict] = None


@dataclass
class JobMetrics:
    """``<job>/metrics.json`` of a pipeline job: both stages' results joined."""

    status: Status = Status.RUNNING
    variant: Optional[str] = None
    wall_seconds: dict[str, float] = field(default_factory=dict)  # per stage, and "total"
    hs: Optional[StageMetrics] = None
    target: Optional[StageMetrics] = None
    quant: Optional[QuantResult] = None  # quant.json of the export step
    # quant-per_tensor.json: the export step again, per-tensor weights (ptq_per_tensor)
    quant_per_tensor: Optional[QuantResult] = None
    qat: Optional[dict] = None  # qat.json of the quantization-aware training step (target_train.qat; qat=true)
    channel_pruning_run: Optional[StageMetrics] = None  # the channel-pruning step's metrics.json (target/<pruning.out>/)
    hs_top1: Optional[float] = None
    top1: Optional[float] = None
    top5: Optional[float] = None
    hs_scales_sha256: Optional[str] = None  # of the file stage one wrote ...
    scales_sha256: Optional[str] = None  # ... and of the file stage two read: equal when the hand-off held
    failed_stage: Optional[str] = None
    error: Optional[str] = None
    config: Optional[dict] = None  # the job's resolved config (PipelineConfig)
    manifest: Optional[dict] = None  # the stages' metrics.json files, each holding its own manifest


Result = Union[StageMetrics, JobMetrics]
R = TypeVar("R", StageMetrics, JobMetrics)
Record = TypeVar("Record")  # any of this module's dataclasses

# Keys older versions wrote, as (type, old key) -> the field that holds them now: "prune"/"pruned"
# named the channel-pruning records, before "pruned" was left to Status.PRUNED. A file written
# before the rename still reads (pipelines.compare over older sweeps).
RENAMED = {
    (StageMetrics, "prune"): "channel_pruning",
    (JobMetrics, "pruned"): "channel_pruning_run",
}


def to_dict(result) -> dict:
    """The JSON document of a result (enums as their values)."""
    return dataclasses.asdict(result, dict_factory=lambda items: {k: v.value if isinstance(v, Enum) else v for k, v in items})


def _record_type(kind) -> type | None:
    """The dataclass inside ``Optional[X]`` (or ``X`` itself), which a nested dict is read as."""
    for arg in get_args(kind) if get_origin(kind) is Union else (kind,):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def from_dict(cls: type[Record], data: dict) -> Record:
    """The typed record of a JSON document (``metrics.json``, ``quant.json``); keys the type does not
    know are ignored and renamed keys (``RENAMED``) read into their new field (files written by
    other versions stay readable); nested records (stage results, ChannelPruning, QuantResult) are
    typed too."""
    hints = get_type_hints(cls)
    data = dict(data)
    for (owner, old), new in RENAMED.items():
        if owner is cls and old in data and new not in data:
            data[new] = data.pop(old)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        kind = hints[f.name]
        nested = _record_type(kind)
        if kind is Status:
            value = Status(value) if value in Status._value2member_map_ else Status.FAILED
        elif nested is not None and isinstance(value, dict):
            value = from_dict(nested, value)
        values[f.name] = value
    return cls(**values)


def read_result(path: str | Path, cls: type[Record]) -> Record | None:
    """``path`` as a ``cls``; None when it is missing or not JSON (a run killed before it wrote any)."""
    data = read_json(path)
    return from_dict(cls, data) if isinstance(data, dict) else None


def write_result(path: str | Path, result: Result) -> None:
    write_json(path, to_dict(result))


def record_failure(path: str | Path, cls: type[Result], status: Status, message: str) -> None:
    """Mark the result at ``path`` as failed with ``message``, keeping what it already held; a
    result that already records a precise outcome (completed, diverged, interrupted) stands."""
    previous = read_result(path, cls)
    if previous is not None and previous.status in FINAL:
        return
    write_result(path, dataclasses.replace(previous or cls(), status=status, error=message))
