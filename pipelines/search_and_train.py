"""The search-then-train job: ``python -m pipelines.search_and_train`` (``repopt-search-and-train``).

One Hydra job runs stage one into ``<job>/hs/``, hands its ``scales.safetensors`` to stage two in
``<job>/target/`` and writes ``<job>/metrics.json`` joining both: HS and target metrics, the sha256
of the scales stage one wrote and of the scales stage two loaded, and wall time per stage.
With ``-m`` any setting of either stage is swept; ``pipelines.compare`` reads the sweep.
A stage whose ``metrics.json`` says completed is not run again (re-running a job resumes it).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import hydra
from omegaconf import DictConfig

from hypersearch.app import train_hypersearch
from repopt.app import run_app
from repopt.errors import ConfigError, RepOptError, status_of
from repopt.io import write_json
from target_train.app import train_target
from target_train.export import export_run

from .config import VARIANTS, PipelineConfig

log = logging.getLogger("pipelines.search_and_train")


def _finished(path: Path) -> dict | None:
    """The stage's result file if it records a finished stage (files without a status, like quant.json, do)."""
    if path.is_file():
        result = json.loads(path.read_text())
        if result.get("status", "completed") == "completed":
            return result
    return None


def _run_stage(name: str, run: Callable[[], dict], result_file: Path, summary: dict, job_dir: Path) -> dict:
    """Run one stage unless ``result_file`` shows it finished; a failure is recorded in the job's metrics."""
    done = _finished(result_file)
    if done is not None:
        log.info("%s already completed (%s): skipped", name, result_file)
        return done
    t0 = time.perf_counter()
    try:
        result_file.parent.mkdir(parents=True, exist_ok=True)
        return run()
    except RepOptError as exc:
        summary.update(status=status_of(exc), failed_stage=name, error=str(exc))
        raise
    finally:
        summary["wall_seconds"][name] = time.perf_counter() - t0
        if summary.get("failed_stage") == name:
            write_json(job_dir / "metrics.json", summary)


def stage_configs(cfg: PipelineConfig, job_dir: Path):
    """The two stage configs of a job, with the variant applied and resume passed through."""
    if cfg.variant not in VARIANTS:
        raise ConfigError(f"variant={cfg.variant!r}: choose one of {', '.join(VARIANTS)}")
    hs = replace(cfg.hs, resume=cfg.resume or cfg.hs.resume, run_dir=None)
    target = replace(cfg.target, resume=cfg.resume or cfg.target.resume, run_dir=None)
    if cfg.variant == "searched":
        target = replace(target, scales=str(job_dir / "hs"), model="target")
    elif cfg.variant == "plain":
        target = replace(target, scales="none", model="target")
    elif cfg.variant == "init":
        target = replace(target, scales="init", model="target")
    elif cfg.variant == "repvgg":
        target = replace(target, scales="none", model="repvgg")
    elif not target.scales or str(target.scales).lower() in ("none", "init"):
        raise ConfigError("variant=custom needs target.scales=<file | run dir | official:X>")
    return (hs if cfg.variant == "searched" else None), target


def run_pipeline(cfg: PipelineConfig, job_dir: Path) -> dict:
    hs_cfg, target_cfg = stage_configs(cfg, job_dir)
    summary: dict = {"status": "running", "variant": cfg.variant, "wall_seconds": {}}
    hs_metrics = None
    hs_dir, target_dir = job_dir / "hs", job_dir / "target"
    if hs_cfg is not None:
        hs_metrics = _run_stage("hs", lambda: train_hypersearch(hs_cfg, hs_dir), hs_dir / "metrics.json", summary, job_dir)
        summary["hs"] = hs_metrics
    target_metrics = _run_stage("target", lambda: train_target(target_cfg, target_dir), target_dir / "metrics.json",
                                summary, job_dir)
    summary["target"] = target_metrics
    if cfg.export:
        quant_cfg = replace(cfg.quant, run=str(target_dir))
        summary["quant"] = _run_stage("export", lambda: export_run(quant_cfg), target_dir / "quant.json", summary, job_dir)
    summary.update(
        status="completed",
        hs_top1=hs_metrics["top1"] if hs_metrics else None,
        top1=target_metrics["top1"],
        top5=target_metrics["top5"],
        hs_scales_sha256=hs_metrics.get("scales_sha256") if hs_metrics else None,
        scales_sha256=(target_metrics.get("scales") or {}).get("sha256"),
    )
    summary["wall_seconds"]["total"] = sum(summary["wall_seconds"].values())
    write_json(job_dir / "metrics.json", summary)
    log.info("pipeline done: HS top-1 %s, target top-1 %.2f", summary["hs_top1"], summary["top1"])
    return summary


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="search_and_train")
def main(cfg: DictConfig):
    return run_app(cfg, PipelineConfig, run_pipeline)


if __name__ == "__main__":
    main()
