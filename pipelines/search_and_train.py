"""The search-then-train job: ``python -m pipelines.search_and_train`` (``repopt-search-and-train``).

One Hydra job runs stage one into ``<job>/hs/``, hands the ``scales.safetensors`` it wrote (the path
stage one reports) to stage two in ``<job>/target/`` and writes ``<job>/metrics.json`` (a
``JobMetrics``) joining both: HS and target metrics, the sha256 of the scales stage one wrote and
of the scales stage two read, and wall time per stage. With ``-m`` any setting of either stage is
swept; ``pipelines.compare`` reads the sweep. A stage whose result says completed is not run
again (re-running a job resumes it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, TypeVar

import hydra
from omegaconf import DictConfig

from hypersearch.app import train_hypersearch
from repopt.app import run_app
from repopt.errors import ConfigError, RepOptError
from repopt.family import get_family
from repopt.io import read_json
from repopt.results import JobMetrics, StageMetrics, Status, read_result, status_of, write_result
from repopt.tracking import tracked
from target_train.app import train_target
from target_train.export import export_run
from target_train.prune import prune_run

from .config import VARIANTS, PipelineConfig

log = logging.getLogger("pipelines.search_and_train")
T = TypeVar("T")


def _finished_stage(path: Path) -> StageMetrics | None:
    result = read_result(path, StageMetrics)
    return result if result is not None and result.status == Status.COMPLETED else None


def _finished_export(path: Path) -> dict | None:
    return read_json(path)  # quant.json is written only when the export finished


def _run_stage(name: str, stage_dir: Path, run: Callable[[], T], finished: Callable[[], T | None],
               summary: JobMetrics, job_dir: Path) -> T:
    """Run one stage in ``stage_dir`` unless ``finished()`` returns its result; a failure is recorded
    in the job's metrics."""
    done = finished()
    if done is not None:
        log.info("%s already completed: skipped", name)
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


def stage_configs(cfg: PipelineConfig):
    """The two stage configs of a job, with the variant applied and resume passed through.

    For ``searched`` the target's ``scales`` is left unset here: it is the file stage one writes.
    """
    if cfg.variant not in VARIANTS:
        raise ConfigError(f"variant={cfg.variant!r}: choose one of {', '.join(VARIANTS)}")
    hs = replace(cfg.hs, resume=cfg.resume or cfg.hs.resume, run_dir=None)
    target = replace(cfg.target, resume=cfg.resume or cfg.target.resume, run_dir=None)
    if cfg.variant == "searched":
        target = replace(target, scales=None, model="target")
    elif cfg.variant == "plain":
        target = replace(target, scales="none", model="target")
    elif cfg.variant == "init":
        target = replace(target, scales="init", model="target")
    elif cfg.variant == "repvgg":
        target = replace(target, scales="none", model=get_family(target.family).baseline_mode)
    elif not target.scales or str(target.scales).lower() in ("none", "init"):
        raise ConfigError("variant=custom needs target.scales=<file | run dir | official:X>")
    return (hs if cfg.variant == "searched" else None), target


@tracked("search_and_train", ("metrics.json",), attach=False)  # the job's run; the stages' runs nest under it
def run_pipeline(cfg: PipelineConfig, job_dir: Path,
                 after_stage: Callable[[str, StageMetrics], None] | None = None) -> JobMetrics:
    """Run the job into ``job_dir``. ``after_stage(name, result)`` is called once a stage has
    completed, before the next one starts; an exception it raises ends the job there (a search
    driver's pruner, ``pipelines.tune``)."""
    hs_cfg, target_cfg = stage_configs(cfg)
    summary = JobMetrics(variant=cfg.variant)
    hs_dir, target_dir = job_dir / "hs", job_dir / "target"
    if hs_cfg is not None:
        summary.hs = _run_stage("hs", hs_dir, lambda: train_hypersearch(hs_cfg, hs_dir),
                                lambda: _finished_stage(hs_dir / "metrics.json"), summary, job_dir)
        if after_stage is not None:
            after_stage("hs", summary.hs)
        target_cfg = replace(target_cfg, scales=summary.hs.scales_file)  # exactly the file stage one wrote
    summary.target = _run_stage("target", target_dir, lambda: train_target(target_cfg, target_dir),
                                lambda: _finished_stage(target_dir / "metrics.json"), summary, job_dir)
    if after_stage is not None:
        after_stage("target", summary.target)
    if cfg.export:
        quant_cfg = replace(cfg.quant, run=str(target_dir))
        summary.quant = _run_stage("export", target_dir, lambda: export_run(quant_cfg),
                                   lambda: _finished_export(target_dir / "quant.json"), summary, job_dir)
    if cfg.prune:
        prune_cfg = replace(cfg.pruning, run=str(target_dir))
        summary.pruned = _run_stage("prune", target_dir, lambda: prune_run(prune_cfg),
                                    lambda: _finished_stage(target_dir / prune_cfg.out / "metrics.json"), summary, job_dir)
    summary.status = Status.COMPLETED
    summary.hs_top1 = summary.hs.top1 if summary.hs else None
    summary.top1, summary.top5 = summary.target.top1, summary.target.top5
    summary.hs_scales_sha256 = summary.hs.scales_sha256 if summary.hs else None
    summary.scales_sha256 = (summary.target.scales or {}).get("sha256")
    summary.wall_seconds["total"] = sum(summary.wall_seconds.values())
    write_result(job_dir / "metrics.json", summary)
    log.info("pipeline done: HS top-1 %s, target top-1 %.2f", summary.hs_top1, summary.top1)
    return summary


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="search_and_train")
def main(cfg: DictConfig):
    return run_app(cfg, PipelineConfig, run_pipeline, JobMetrics)


if __name__ == "__main__":
    main()
