"""One trial of ``pipelines.tune``: sample, compose the pipeline config, run one job, report to the pruner.

A trial is an ordinary pipeline job in ``<study_dir>/trial_<n>/`` (the layout ``pipelines.compare``
reads: ``metrics.json``, ``hs/``, ``target/``, and ``.hydra/overrides.yaml`` with the base overrides
plus the sampled values), and ``trial.json`` (number, state, values, params) for compare's
Optuna columns.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from repopt.config import to_typed
from repopt.engine.callbacks import Callback, active
from repopt.errors import ConfigError, Interrupted, RepOptError
from repopt.io import write_json, write_text
from repopt.results import JobMetrics, StageMetrics, Status, read_result, record_failure, status_of, write_result

from ..config import PipelineConfig
from .config import TARGET_STEP_OFFSET, ParamSpec, TuneConfig

log = logging.getLogger("pipelines.tune")


class TrialFailed(Exception):
    """A trial's job failed on its own (bad sampled value, divergence, missing data): the trial is
    FAIL and the study goes on."""


def trial_dir(study_dir: Path, number: int) -> Path:
    return study_dir / f"trial_{number}"


# ------------------------------------------------------------------ the pipeline config of a trial


def override_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (a string that would read as another type is quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if isinstance(yaml.safe_load(text) if text else None, str) and all(c.isalnum() or c in "_-./:" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def trial_overrides(cfg: TuneConfig, params: dict[str, Any]) -> list[str]:
    return list(cfg.base) + [f"{key}={override_value(value)}" for key, value in params.items()]


def compose_pipeline(overrides: list[str]) -> DictConfig:
    """The pipeline's root config (``conf/search_and_train.yaml``) with ``overrides``, by Hydra's compose API."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    try:
        if GlobalHydra.instance().is_initialized():  # inside the tune app: its search path (plus any --config-dir)
            return compose(config_name="search_and_train", overrides=overrides)
        with initialize_config_module("repopt.conf", version_base="1.3"):
            return compose(config_name="search_and_train", overrides=overrides)
    except HydraException as exc:  # a key the pipeline does not have, a group option that does not exist, ...
        message = " ".join(str(exc).split())
        raise ConfigError(
            f"the pipeline config does not compose with {' '.join(overrides)}: {message}; check the "
            f"keys of base and space (pipeline config paths such as hs.optim.lr)"
        ) from None


def pipeline_config(overrides: list[str]) -> tuple[DictConfig, PipelineConfig]:
    """The composed config and its typed, validated form (a ConfigError names a bad key or value)."""
    composed = compose_pipeline(overrides)
    return composed, to_typed(composed, PipelineConfig)


def check_space(cfg: TuneConfig) -> None:
    """Compose the base with each end of every dimension, so a misspelt key or a value the schema
    refuses is one error before any trial runs."""
    for end in (0, 1):
        pipeline_config(trial_overrides(cfg, {key: spec.extremes()[end] for key, spec in cfg.space.items()}))


def suggest(trial, key: str, spec: ParamSpec) -> Any:
    if spec.type == "categorical":
        return trial.suggest_categorical(key, list(spec.choices))
    if spec.type == "int":
        return trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(key, float(spec.low), float(spec.high), step=spec.step, log=spec.log)


# ------------------------------------------------------------------ pruning


@dataclass
class PruneDecision:
    stage: str  # hs | target
    epoch: int  # 1-based epoch of that stage
    step: int
    value: float

    def note(self) -> str:
        return f"pruned after {self.stage} epoch {self.epoch} (step {self.step}): test top-1 {self.value:.2f}"


class PruningCallback(Callback):
    """Reports each epoch's test top-1 to the trial (HS epoch e: step e - 1; target epoch e: step
    ``TARGET_STEP_OFFSET`` + e - 1) and asks the pruner. When it says prune, a stage that has epochs
    left is stopped at once (``request_stop``: last.pt, then ``Interrupted``); after a stage's last
    epoch the job ends before the next stage (``after_stage``). A target that ran all its epochs is
    a finished trial and is not pruned. Unless ``during_search``, stage one's epochs are reported but
    the pruner is not asked (see ``PrunerConfig.during_search``)."""

    def __init__(self, trial, during_search: bool = False):
        self.trial = trial
        self.during_search = during_search
        self.pruned: PruneDecision | None = None

    def on_epoch_end(self, trainer, row: dict) -> None:
        stage = "hs" if trainer.metrics_extra.get("stage") == "hypersearch" else "target"
        value = row.get("test_top1")
        if value is None or not math.isfinite(value) or self.pruned is not None:
            return
        epoch = int(row["epoch"])
        step = epoch - 1 + (TARGET_STEP_OFFSET if stage == "target" else 0)
        self.trial.report(float(value), step)
        last = trainer.state.epoch >= trainer.cfg.epochs
        if (stage == "target" and last) or (stage == "hs" and not self.during_search):
            return
        if self.trial.should_prune():
            self.pruned = PruneDecision(stage, epoch, step, float(value))
            log.info("trial %d: %s", self.trial.number, self.pruned.note())
            if not last:
                trainer.request_stop()

    def after_stage(self, stage: str, result: StageMetrics) -> None:
        if self.pruned is not None:
            import optuna

            raise optuna.TrialPruned(self.pruned.note())


def mark_pruned(job_dir: Path, decision: PruneDecision, variant: str | None, seconds: float) -> JobMetrics:
    """Record a pruned job: the stage the pruner stopped says ``pruned`` (its last.pt holds the step it
    stopped at), and so does the job's metrics.json, with both stages' results as they are."""
    stages = {}
    for stage in ("hs", "target"):
        path = job_dir / stage / "metrics.json"
        result = read_result(path, StageMetrics)
        if result is not None and stage == decision.stage and result.status == Status.INTERRUPTED:
            result = dataclasses.replace(result, status=Status.PRUNED, error=decision.note())
            write_result(path, result)
        stages[stage] = result
    job = read_result(job_dir / "metrics.json", JobMetrics) or JobMetrics(variant=variant)
    hs, target = stages["hs"], stages["target"]
    job = dataclasses.replace(
        job,
        status=Status.PRUNED,
        failed_stage=decision.stage,
        error=decision.note(),
        hs=hs,
        target=target,
        hs_top1=hs.top1 if hs else None,
        top1=target.top1 if target else None,
        top5=target.top5 if target else None,
        hs_scales_sha256=hs.scales_sha256 if hs else job.hs_scales_sha256,
    )
    for stage, result in stages.items():
        if result is not None and stage not in job.wall_seconds and result.wall_seconds is not None:
            job.wall_seconds[stage] = result.wall_seconds
    job.wall_seconds["total"] = seconds
    write_result(job_dir / "metrics.json", job)
    return job


# ------------------------------------------------------------------ the objective


def objective_values(cfg: TuneConfig, result: JobMetrics) -> list[float]:
    target = result.target or StageMetrics()
    found = {
        "top1": result.top1,
        "top5": result.top5,
        "hs_top1": result.hs_top1,
        "images_per_sec": target.images_per_sec,
        "wall_seconds": result.wall_seconds.get("total"),
    }
    values = [found[name] for name in cfg.objectives]
    missing = [name for name, v in zip(cfg.objectives, values) if v is None or not math.isfinite(v)]
    if missing:
        raise TrialFailed(f"the job has no value for objective(s) {', '.join(missing)}")
    return [float(v) for v in values]


def frozen(trial):
    """The stored state of a running ``optuna.Trial`` (a FrozenTrial)."""
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def trial_record(trial, study_dir: Path) -> dict:
    """``trial.json``: the Optuna side of a trial (a FrozenTrial)."""
    start, end = trial.datetime_start, trial.datetime_complete
    return {
        "number": trial.number,
        "state": trial.state.name,
        "values": trial.values,
        "params": dict(trial.params),
        "intermediate_values": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
        "retry_of": trial.system_attrs.get("failed_trial"),
        "datetime_start": start.isoformat() if start else None,
        "datetime_complete": end.isoformat() if end else None,
        "duration_seconds": (end - start).total_seconds() if start and end else None,
        "dir": str(trial_dir(study_dir, trial.number)),
    }


class TrialRunner:
    """The study's objective. ``claim`` is released as soon as Optuna has handed out the trial."""

    def __init__(self, cfg: TuneConfig, study_dir: Path, claim, make_sampler=None):
        self.cfg, self.study_dir, self.claim = cfg, study_dir, claim
        self.make_sampler = make_sampler  # seed -> sampler: each trial samples from (seed, number)
        self.current: int | None = None  # the number of the trial this worker runs

    def __call__(self, trial):
        self.claim.release()
        self.current = trial.number
        if self.make_sampler is not None and self.cfg.sampler.seed is not None:
            trial.study.sampler = self.make_sampler((self.cfg.sampler.seed * 1_000_003 + trial.number) % 2**32)
        params = {key: suggest(trial, key, spec) for key, spec in self.cfg.space.items()}
        job_dir = trial_dir(self.study_dir, trial.number)
        overrides = trial_overrides(self.cfg, params)
        job_dir.mkdir(parents=True, exist_ok=True)
        write_text(job_dir / ".hydra" / "overrides.yaml", yaml.safe_dump(overrides, default_flow_style=False))
        record = trial_record(frozen(trial), self.study_dir)
        write_json(job_dir / "trial.json", record)
        retry = record["retry_of"]
        log.info(
            "trial %d%s: %s",
            trial.number,
            f" (re-run of trial {retry})" if retry is not None else "",
            " ".join(overrides[len(self.cfg.base) :]),
        )
        t0 = time.perf_counter()
        pruning = PruningCallback(trial, self.cfg.pruner.during_search) if len(self.cfg.objectives) == 1 else None
        variant = None
        try:
            composed, pipeline_cfg = pipeline_config(overrides)
            variant = pipeline_cfg.variant
            write_text(job_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(composed, resolve=True))
            with active(*([pruning] if pruning else [])):
                from ..job import run_pipeline  # here: the study's settings are checked before torch loads

                result = run_pipeline(pipeline_cfg, job_dir, after_stage=pruning.after_stage if pruning else None)
        except Exception as exc:
            import optuna

            if pruning is not None and pruning.pruned is not None and isinstance(exc, (Interrupted, optuna.TrialPruned)):
                mark_pruned(job_dir, pruning.pruned, variant, time.perf_counter() - t0)
                raise optuna.TrialPruned(pruning.pruned.note()) from None
            if isinstance(exc, Interrupted):  # a stop signal: the trial is re-run when the study continues
                raise
            message = str(exc) if isinstance(exc, RepOptError) else f"{type(exc).__name__}: {exc}"
            record_failure(job_dir / "metrics.json", JobMetrics, status_of(exc), message)
            if isinstance(exc, RepOptError):
                log.error("trial %d failed: %s", trial.number, message)
                raise TrialFailed(message) from exc
            raise  # a bug: the trial is FAIL and the study stops with the traceback
        values = objective_values(self.cfg, result)
        log.info("trial %d: %s", trial.number, ", ".join(f"{n} {v:.4g}" for n, v in zip(self.cfg.objectives, values)))
        return values[0] if len(values) == 1 else values

    def after_trial(self, study, trial) -> None:
        """Optuna's per-trial callback (after the trial's state is stored): ``trial.json`` says it."""
        if trial_dir(self.study_dir, trial.number).is_dir():
            write_json(trial_dir(self.study_dir, trial.number) / "trial.json", trial_record(trial, self.study_dir))
