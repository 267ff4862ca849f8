"""One search-then-train job and its optional steps (the app, and what a job does and skips:
``pipelines/search_and_train.py``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, TypeVar

from hypersearch.search import train_hypersearch
from repopt.config import to_plain
from repopt.errors import ConfigError, RepOptError, ScalesError
from repopt.family import get_family
from repopt.faults import fault_point
from repopt.io import read_json, sha256_file
from repopt.results import (
    PER_TENSOR_TAG,
    QAT_RESULT,
    JobMetrics,
    QuantResult,
    StageMetrics,
    Status,
    quant_name,
    read_result,
    status_of,
    write_result,
)
from repopt.rundir import SHARED_SEARCHES, RunLock, RunRefused, changed_settings, file_record, verify_manifest, without_allowed
from repopt.scales import SCALES_FILENAME
from repopt.tracking import tracked
from target_train import quantize
from target_train.exporter import export_run
from target_train.pruner import prune_run
from target_train.qat_trainer import qat_run, require_torchao
from target_train.train import train_target

from .config import SEARCHING, VARIANTS, PipelineConfig

log = logging.getLogger("pipelines.search_and_train")
T = TypeVar("T")


def _finished_stage(path: Path, cfg=None) -> StageMetrics | None:
    """The stage's result when it completed the same work (config, manifest); None: run it (again).

    A completed stage recorded with other settings is refused: its directory belongs to another job.
    Without ``cfg`` (the pruning step, whose settings are part of the job's, checked for the whole
    job) the status alone decides."""
    result = read_result(path, StageMetrics)
    if result is None or result.status != Status.COMPLETED:
        return None
    if cfg is None:
        return result
    changed = changed_settings(result.config, to_plain(cfg), to_plain(type(cfg)()), cfg.SETTINGS_ALLOWED)
    if changed:
        raise RunRefused(
            f"{path.parent} holds a completed stage run with other settings ({'; '.join(changed)}); "
            f"choose a new job directory (hydra.run.dir=... / hydra.sweep.dir=...). Nothing was changed"
        )
    problems = verify_manifest(path.parent, result.manifest)
    if problems:
        log.warning("%s: completed, but %s: running it again from its checkpoint", path.parent, "; ".join(problems))
        return None
    return result


def _resume_if_completed(cfg: T, stage_dir: Path) -> T:
    """A completed stage that is not skipped (a file of its manifest is damaged or missing) continues
    from its own checkpoint: its settings were just checked to be the requested ones."""
    result = read_result(stage_dir / "metrics.json", StageMetrics)
    return replace(cfg, resume=True) if result is not None and result.status == Status.COMPLETED else cfg


def _finished_export(path: Path) -> QuantResult | None:
    """The export step's result file (quant*.json), typed; export writes it only when it finished."""
    return read_result(path, QuantResult)


def _finished_qat(path: Path) -> dict | None:
    """The QAT step's qat.json (kept in its own format); QAT writes it only when it finished."""
    return read_json(path)


def _run_stage(
    name: str, stage_dir: Path, run: Callable[[], T], finished: Callable[[], T | None], summary: JobMetrics, job_dir: Path
) -> T:
    """Run one stage in ``stage_dir`` unless ``finished()`` returns its result; a failure is recorded
    in the job's metrics."""
    done = finished()
    if done is not None:
        log.info("%s already completed with the same settings: skipped", name)
        previous = read_result(job_dir / "metrics.json", JobMetrics)
        seconds = (previous.wall_seconds if previous is not None else {}).get(name)
        if seconds is None and isinstance(done, StageMetrics):
            seconds = done.wall_seconds
        if seconds is not None:
            summary.wall_seconds[name] = seconds  # the time the stage took when it ran
        return done
    t0 = time.perf_counter()
    try:
        stage_dir.mkdir(parents=True, exist_ok=True)
        return run()
    except RepOptError as exc:
        summary.status, summary.failed_stage, summary.error = status_of(exc), name, str(exc)
        raise
    finally:
        summary.wall_seconds[name] = time.perf_counter() - t0
        if summary.failed_stage == name:
            write_result(job_dir / "metrics.json", summary)


def handed_off_scales(hs_dir: Path, sha256: str | None) -> Path:
    """The scales file a completed stage one in ``hs_dir`` wrote, checked against the sha256 it recorded:
    stage two of ``searched`` never trains without exactly those scales."""
    path = hs_dir / SCALES_FILENAME
    if not sha256 or not path.is_file():
        raise ScalesError(
            f"{hs_dir}: stage one completed without a scales file on record ({path}); run the job again with resume=true"
        )
    actual = sha256_file(path)
    if actual != sha256:
        raise ScalesError(
            f"{path}: differs from the file stage one wrote (sha256 {actual[:12]}..., recorded {sha256[:12]}...); "
            f"it was damaged or replaced. Delete {hs_dir / 'metrics.json'} and run again with resume=true to "
            f"re-export it"
        )
    return path


def stage_configs(cfg: PipelineConfig):
    """The two stage configs of a job, with the variant applied and resume passed through.

    For the variants that search (``SEARCHING``) the target's ``scales`` is left unset here: it is the
    file stage one writes."""
    if cfg.variant not in VARIANTS:
        raise ConfigError(f"variant={cfg.variant!r}: choose one of {', '.join(VARIANTS)}")
    hs = replace(cfg.hs, resume=cfg.resume or cfg.hs.resume, run_dir=None)
    target = replace(cfg.target, resume=cfg.resume or cfg.target.resume, run_dir=None)
    given = {
        "searched": dict(scales=None),
        "channel_mean": dict(scales=None, scales_transform="channel_mean"),
        "reinit_only": dict(scales=None, masks=False),
        "masks_only": dict(scales=None, reinit=False),
        "plain": dict(scales="none"),
        "init": dict(scales="init"),
        "ones": dict(scales="ones"),
        "official_mean": dict(scales="official_mean"),
        "repvgg": dict(scales="none", model=get_family(target.family).baseline_mode),
        "qarepvgg": dict(scales="none", model="qarepvgg"),  # PipelineConfig.check: vgg only
    }
    if cfg.variant == "custom" and (not target.scales or str(target.scales).lower() in ("none", "init")):
        raise ConfigError("variant=custom needs target.scales=<file | run dir | official:X>")
    target = replace(target, **{"model": "target", **given.get(cfg.variant, {})})
    return (hs if cfg.variant in SEARCHING else None), target


def search_dir(job_dir: Path, hs_cfg, shared: bool) -> Path:
    """Where a job's stage one runs: ``<job>/hs``; with ``shared_search``, ``<job>/hs`` is a link to
    ``<sweep>/searches/<hash of its settings>``, the one search every job with the same settings uses."""
    hs_dir = job_dir / "hs"
    if not shared:
        return hs_dir
    key = hashlib.sha256(json.dumps(without_allowed(to_plain(hs_cfg)), sort_keys=True, default=str).encode()).hexdigest()
    target = job_dir.parent / SHARED_SEARCHES / key[:16]
    target.mkdir(parents=True, exist_ok=True)
    if hs_dir.is_symlink() and hs_dir.resolve() == target.resolve():
        return hs_dir
    if hs_dir.exists() or hs_dir.is_symlink():
        raise RunRefused(
            f"{hs_dir} is not the shared search of these settings ({target}); this job searched on its own "
            f"before: run it with shared_search=false, or in a new directory"
        )
    hs_dir.symlink_to(os.path.relpath(target, job_dir))  # relative: a moved sweep keeps its links
    return hs_dir


@tracked("search_and_train", ("metrics.json",), attach=False)  # the job's run; the stages' runs nest under it
def run_pipeline(
    cfg: PipelineConfig, job_dir: Path, after_stage: Callable[[str, StageMetrics], None] | None = None
) -> JobMetrics:
    """Run the job into ``job_dir``. ``after_stage(name, result)`` is called once a stage has
    completed, before the next one starts; an exception it raises ends the job there (a search
    driver's pruner, ``pipelines.tune``)."""
    hs_cfg, target_cfg = stage_configs(cfg)
    if cfg.export or cfg.qat:  # a missing package must not wait for two trained stages to show
        quantize.require_onnxruntime()
    if cfg.qat:
        require_torchao()
    summary = JobMetrics(variant=cfg.variant, config=to_plain(cfg))
    target_dir = job_dir / "target"
    expected_scales = None
    if hs_cfg is not None:
        hs_dir = search_dir(job_dir, hs_cfg, cfg.shared_search)
        # a shared search is continued by whichever job comes to it: its settings are these, by its hash
        hs_run = replace(hs_cfg, resume=True) if cfg.shared_search else _resume_if_completed(hs_cfg, hs_dir)
        with RunLock(hs_dir, wait=cfg.shared_search):  # a job of a parallel sweep waits for the search it shares
            summary.hs = _run_stage(
                "hs",
                hs_dir,
                lambda: train_hypersearch(hs_run, hs_dir),
                lambda: _finished_stage(hs_dir / "metrics.json", hs_cfg),
                summary,
                job_dir,
            )
        if after_stage is not None:
            after_stage("hs", summary.hs)
        fault_point("job.between_stages")
        expected_scales = summary.hs.scales_sha256
        target_cfg = replace(target_cfg, scales=str(handed_off_scales(hs_dir, expected_scales)))
    target_run = _resume_if_completed(target_cfg, target_dir)
    summary.target = _run_stage(
        "target",
        target_dir,
        lambda: train_target(target_run, target_dir),
        lambda: _finished_stage(target_dir / "metrics.json", target_cfg),
        summary,
        job_dir,
    )
    if expected_scales is not None and (summary.target.scales or {}).get("sha256") != expected_scales:
        raise ScalesError(
            f"{target_dir}: stage two trained with scales of sha256 {(summary.target.scales or {}).get('sha256')}, "
            f"not the file stage one wrote ({expected_scales}); run this job in a new directory"
        )
    if after_stage is not None:
        after_stage("target", summary.target)
    if cfg.export:
        quant_cfg = replace(cfg.quant, run=str(target_dir))
        summary.quant = _run_stage(
            "export",
            target_dir,
            lambda: export_run(quant_cfg),
            lambda: _finished_export(target_dir / quant_name(quant_cfg.tag)),
            summary,
            job_dir,
        )
    if cfg.export and cfg.ptq_per_tensor:
        per_tensor_cfg = replace(cfg.quant, run=str(target_dir), per_channel=False, tag=PER_TENSOR_TAG)
        summary.quant_per_tensor = _run_stage(
            "export_per_tensor",
            target_dir,
            lambda: export_run(per_tensor_cfg),
            lambda: _finished_export(target_dir / quant_name(PER_TENSOR_TAG)),
            summary,
            job_dir,
        )
    if cfg.qat:
        qat_cfg = replace(cfg.qat_train, run=str(target_dir))
        summary.qat = _run_stage(
            "qat", target_dir, lambda: qat_run(qat_cfg), lambda: _finished_qat(target_dir / QAT_RESULT), summary, job_dir
        )
    if cfg.prune:
        prune_cfg = replace(cfg.pruning, run=str(target_dir))
        summary.channel_pruning_run = _run_stage(
            "prune",
            target_dir,
            lambda: prune_run(prune_cfg),
            lambda: _finished_stage(target_dir / prune_cfg.out / "metrics.json"),
            summary,
            job_dir,
        )
    summary.status = Status.COMPLETED
    summary.hs_top1 = summary.hs.top1 if summary.hs else None
    summary.top1, summary.top5 = summary.target.top1, summary.target.top5
    summary.hs_scales_sha256 = summary.hs.scales_sha256 if summary.hs else None
    summary.scales_sha256 = (summary.target.scales or {}).get("sha256")
    summary.wall_seconds["total"] = sum(summary.wall_seconds.values())
    summary.manifest = {
        f"{stage}/metrics.json": file_record(job_dir / stage / "metrics.json")
        for stage in ("hs", "target")
        if getattr(summary, stage) is not None
    }
    write_result(job_dir / "metrics.json", summary)
    log.info("pipeline done: HS top-1 %s, target top-1 %.2f", summary.hs_top1, summary.top1)
    return summary
