"""Reading a sweep's job directories into one row per job (``JobRow``), in one pandas frame: every
override in its own column, partial and broken jobs as rows with their status, repeats marked."""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
import yaml

from repopt.errors import ConfigError
from repopt.io import read_json
from repopt.results import (
    PER_TENSOR_TAG,
    QAT_RESULT,
    JobMetrics,
    QuantResult,
    StageMetrics,
    Status,
    from_dict,
    quant_name,
    read_result,
)

log = logging.getLogger("pipelines.compare")
SEED_KEYS = ("seed", "hs.seed", "target.seed")
INCOMPLETE = "incomplete"  # a job killed before it wrote any result: pre-empted or crashed hard
DUPLICATE = "duplicate"  # the comparison.csv column of jobs left out as repeats of a newer one
UNREADABLE = "metrics.json is not readable JSON"


def _metric():
    """A numeric column, aggregated as mean ± std over seeds."""
    return field(default=None, metadata={"metric": True})


@dataclass
class JobRow:
    """The result columns of one job in ``comparison.csv``, read from its typed results; every other
    column of the frame is one of the job's overrides."""

    status: str = INCOMPLETE  # a Status value, or "incomplete"
    error: Optional[str] = None
    failed_stage: Optional[str] = None
    diverged_step: Optional[int] = None
    variant: Optional[str] = None
    arch_name: Optional[str] = None  # the target's (or the single stage's) architecture ...
    depth: Optional[int] = None  # ... and its conv layers
    dataset: Optional[str] = None
    hs_top1: Optional[float] = _metric()
    hs_top5: Optional[float] = None
    hs_loss: Optional[float] = None
    target_top1: Optional[float] = _metric()
    target_top5: Optional[float] = _metric()
    target_loss: Optional[float] = _metric()
    target_status: Optional[str] = None
    hs_seconds: Optional[float] = None
    target_seconds: Optional[float] = None
    wall_seconds: Optional[float] = _metric()
    hs_scales_sha256: Optional[str] = None
    scales_sha256: Optional[str] = None
    fp32_top1: Optional[float] = None
    int8_top1: Optional[float] = _metric()  # static INT8 PTQ (quant.json)
    int8_top1_drop: Optional[float] = _metric()
    int8_pt_top1: Optional[float] = _metric()  # the same PTQ with per-tensor weights (quant-per_tensor.json)
    int8_pt_top1_drop: Optional[float] = _metric()
    qat_top1: Optional[float] = _metric()  # ONNX Runtime INT8 after quantization-aware training (qat.json)
    qat_top1_drop: Optional[float] = _metric()  # vs the FP32 folded model QAT started from
    prune_ratio: Optional[float] = _metric()  # the pruning step (target_train.prune), when its result exists
    pruned_top1_no_ft: Optional[float] = _metric()  # right after pruning
    pruned_top1: Optional[float] = _metric()  # after fine-tuning
    pruned_macs_ratio: Optional[float] = _metric()  # pruned / unpruned MACs of the deployed model
    pruned_ms_b1: Optional[float] = _metric()  # ONNX Runtime ms per image, batch 1
    pruned_speedup_b1: Optional[float] = _metric()  # unpruned / pruned latency, timed side by side
    pruned_speedup_b32: Optional[float] = _metric()

    @classmethod
    def of_job(cls, m: JobMetrics, job: Path, pruned: str = "pruned") -> "JobRow":
        """A pipeline job: both stages, and the stage that diverged if one did."""
        hs, target = m.hs or StageMetrics(), m.target or StageMetrics()
        trained = m.target or m.hs or StageMetrics()
        row = cls(
            status=m.status.value,
            error=m.error,
            failed_stage=m.failed_stage,
            variant=m.variant,
            arch_name=trained.arch,
            depth=trained.depth,
            dataset=trained.dataset,
            hs_top1=hs.top1,
            hs_top5=hs.top5,
            target_top1=target.top1,
            target_top5=target.top5,
            target_loss=target.loss,
            target_status=m.target.status.value if m.target else None,
            hs_seconds=m.wall_seconds.get("hs"),
            target_seconds=m.wall_seconds.get("target"),
            wall_seconds=m.wall_seconds.get("total"),
            hs_scales_sha256=m.hs_scales_sha256,
            scales_sha256=m.scales_sha256,
        )
        for stage in ("hs", "target"):
            result = read_result(job / stage / "metrics.json", StageMetrics)
            if result is not None and result.status == Status.DIVERGED:
                row.status, row.failed_stage, row.diverged_step = Status.DIVERGED.value, stage, result.diverged_step
        return row.with_quant(job / "target").with_pruned(job / "target" / pruned / "metrics.json")

    @classmethod
    def of_stage(cls, m: StageMetrics, job: Path, pruned: str = "pruned") -> "JobRow":
        """A single-stage run (``python -m hypersearch -m ...`` or ``target_train -m ...``)."""
        key = "hs" if m.stage == "hypersearch" else "target"
        row = cls(
            status=m.status.value,
            error=m.error,
            wall_seconds=m.wall_seconds,
            diverged_step=m.diverged_step,
            arch_name=m.arch,
            depth=m.depth,
            dataset=m.dataset,
            scales_sha256=m.scales_sha256 or (m.scales or {}).get("sha256"),
            **{f"{key}_top1": m.top1, f"{key}_top5": m.top5, f"{key}_loss": m.loss},
        )
        return row.with_quant(job).with_pruned(job / pruned / "metrics.json")

    def with_quant(self, run_dir: Path) -> "JobRow":
        """The INT8 columns of a target run's result files, each read from the file itself (the step's own
        record): quant.json, quant-per_tensor.json (the pipeline's ptq_per_tensor) and qat.json."""
        quant = read_result(run_dir / quant_name(), QuantResult)
        if quant is not None:
            self.fp32_top1, self.int8_top1, self.int8_top1_drop = quant.fp32_top1, quant.int8_top1, quant.top1_drop
        per_tensor = read_result(run_dir / quant_name(PER_TENSOR_TAG), QuantResult)
        if per_tensor is not None:
            self.int8_pt_top1, self.int8_pt_top1_drop = per_tensor.int8_top1, per_tensor.top1_drop
        qat = read_json(run_dir / QAT_RESULT)
        if qat:
            self.qat_top1, self.qat_top1_drop = qat.get("int8_top1"), qat.get("top1_drop")
        return self

    def with_pruned(self, path: Path) -> "JobRow":
        result = read_result(path, StageMetrics)
        p = result.channel_pruning if result is not None and result.status == Status.COMPLETED else None
        if p is not None:
            self.prune_ratio, self.pruned_top1_no_ft, self.pruned_top1 = p.ratio, p.top1_pruned, p.top1_finetuned
            self.pruned_macs_ratio = p.macs_ratio
            self.pruned_ms_b1 = p.latency_ms_per_image["pruned"]["batch1"]
            self.pruned_speedup_b1, self.pruned_speedup_b32 = p.speedup["batch1"], p.speedup["batch32"]
        return self


ROW_COLUMNS = tuple(f.name for f in dataclasses.fields(JobRow))
METRIC_COLUMNS = [f.name for f in dataclasses.fields(JobRow) if f.metadata.get("metric")]


def read_result_row(job: Path, pruned: str = "pruned") -> JobRow:
    """The job's ``metrics.json`` through its type: a pipeline job's ``JobMetrics`` or a stage's
    ``StageMetrics``; ``pruned`` names the pruning result folder of its target run."""
    data = read_json(job / "metrics.json")
    if not isinstance(data, dict):  # not written yet, or a file that is not JSON (not even UTF-8)
        return JobRow(error=UNREADABLE if (job / "metrics.json").is_file() else None)
    if "variant" in data:
        return JobRow.of_job(from_dict(JobMetrics, data), job, pruned)
    return JobRow.of_stage(from_dict(StageMetrics, data), job, pruned)


def latest_sweep(root: Path) -> Path:
    """The sweep below ``root`` (or ``root`` itself) that started last: the directory whose
    ``multirun.yaml`` (written once, when Hydra starts the sweep) has the newest mtime. The
    directory's own mtime is no guide: writing a comparison into an old sweep renews it."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(
            f"--latest {root}: not a directory; pass the root of the sweeps, e.g. outputs/search_and_train/multirun"
        )
    sweeps = [p.parent for p in root.rglob("multirun.yaml") if p.is_file()]
    if not sweeps:
        raise ConfigError(f"--latest {root}: no sweep below it (a sweep directory holds the multirun.yaml of a -m run)")
    return max(sweeps, key=lambda d: ((d / "multirun.yaml").stat().st_mtime, _natural_key(d, root)))


def find_jobs(root: Path) -> list[Path]:
    """Job directories below ``root`` (a job has ``.hydra/``); ``root`` itself if it is one."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a directory; pass a sweep directory (outputs/.../multirun/<date>/<time>) or a job directory"
        )
    if (root / ".hydra").is_dir():
        return [root]
    jobs = sorted({p.parent for p in root.rglob(".hydra") if p.is_dir()}, key=lambda p: _natural_key(p, root))
    return [j for j in jobs if j.parent.name not in ("hs", "target")]


def _natural_key(path: Path, root: Path):
    """Numbers in names sort as numbers: 2 before 10, trial_2 before trial_10."""
    return [
        [int(piece) if piece.isdigit() else piece for piece in re.split(r"(\d+)", part)] for part in path.relative_to(root).parts
    ]


def _parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    key = key.lstrip("+~")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, (list, dict)):
        parsed = value  # keep lists/dicts as their text so the column stays hashable
    return key, parsed


def read_overrides(job: Path) -> list[str] | None:
    """The job's Hydra overrides; None when ``.hydra/overrides.yaml`` is missing or cannot be read."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        overrides = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return None
    return [str(o) for o in overrides or []] if isinstance(overrides, (list, type(None))) else None


def read_job(job: Path, pruned: str = "pruned") -> dict:
    """One row: the job's overrides and its metrics (a missing/partial job is a row, too)."""
    row: dict = {"job": str(job)}
    trial = read_json(job / "trial.json")  # a trial of a pipelines.tune study: its Optuna number and state
    if isinstance(trial, dict):
        row["trial"], row["state"] = trial.get("number"), trial.get("state")
    overrides = read_overrides(job) or []
    row["overrides"] = " ".join(o for o in overrides if not o.startswith("sweep="))
    for text in overrides:
        key, value = _parse_override(text)
        if key != "sweep":
            row[key] = value
    results = dataclasses.asdict(read_result_row(job, pruned))
    row.update({k: v for k, v in results.items() if v is not None or k not in row})  # an unknown result keeps the override
    return row


def collect(dirs: list[Path], pruned: str = "pruned") -> pd.DataFrame:
    """One row per job directory below ``dirs``, in order, with ``duplicate`` marking repeats."""
    jobs = [job for d in dirs for job in find_jobs(Path(d))]
    frame = pd.DataFrame([read_job(job, pruned) for job in jobs])
    for column in METRIC_COLUMNS:
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    if len(frame):
        frame[DUPLICATE] = duplicates(jobs)
    return frame


def duplicates(jobs: list[Path]) -> list[bool]:
    """True for each job whose overrides (all of them: seed and sweep= included, in any order)
    equal a newer job's: the same setting and seed is one observation, and a re-run sweep counted
    twice would narrow the intervals with runs that add nothing. The newest job directory (mtime)
    stays; on a tie, the first. Jobs whose overrides are unknown are never taken for repeats."""
    keep: dict[tuple, int] = {}
    identities = [read_overrides(job) for job in jobs]
    mtimes = [job.stat().st_mtime for job in jobs]
    for i, overrides in enumerate(identities):
        if overrides is None:
            continue
        identity = tuple(sorted(o.strip() for o in overrides))
        if identity not in keep or mtimes[i] > mtimes[keep[identity]]:
            keep[identity] = i
    kept = set(keep.values())
    return [identities[i] is not None and i not in kept for i in range(len(jobs))]


def distinct(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` without the jobs marked as repeats (all of it when nothing is marked)."""
    return frame[~frame[DUPLICATE].astype(bool)] if DUPLICATE in frame else frame
