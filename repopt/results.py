"""Typed run results: what ``metrics.json`` holds, for a stage run and for a pipeline job.

The trainer and the apps write these dataclasses and ``pipelines.compare`` reads them back
through the same types, so a field has one name everywhere and a misspelt key is an error
when it is written, not a silently empty column when it is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional, TypeVar, Union, get_args, get_origin, get_type_hints

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
    # the pruning step (stage "prune", target_train.prune): ratio, widths, MACs, accuracy before/after, latency
    prune: Optional[dict] = None
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
    quant: Optional[dict] = None  # quant.json of the export step (its own format)
    quant_per_tensor: Optional[dict] = None  # quant-per_tensor.json: the export step again, per-tensor weights (ptq_per_tensor)
    qat: Optional[dict] = None  # qat.json of the quantization-aware training step (target_train.qat; qat=true)
    pruned: Optional[StageMetrics] = None  # the pruning step's metrics.json (target/<pruning.out>/)
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


def to_dict(result: Result) -> dict:
    """The JSON document of a result (enums as their values)."""
    return dataclasses.asdict(result, dict_factory=lambda items: {k: v.value if isinstance(v, Enum) else v for k, v in items})


def from_dict(cls: type[R], data: dict) -> R:
    """The typed result of a ``metrics.json`` document; keys the type does not know are ignored
    (files written by other versions stay readable), nested stage results are typed too."""
    hints = get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        kind = hints[f.name]
        if kind is Status:
            value = Status(value) if value in Status._value2member_map_ else Status.FAILED
        elif get_origin(kind) is Union and StageMetrics in get_args(kind) and isinstance(value, dict):
            value = from_dict(StageMetrics, value)
        values[f.name] = value
    return cls(**values)


def read_result(path: str | Path, cls: type[R]) -> R | None:
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
