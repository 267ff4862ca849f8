"""The search-then-train job: ``python -m pipelines.search_and_train`` (``repopt-search-and-train``).

One Hydra job runs stage one into ``<job>/hs/``, hands the ``scales.safetensors`` it wrote (the path
stage one reports) to stage two in ``<job>/target/`` and writes ``<job>/metrics.json`` (a
``JobMetrics``) joining both: HS and target metrics, the sha256 of the scales stage one wrote and
of the scales stage two read, and wall time per stage. With ``-m`` any setting of either stage is
swept; ``pipelines.compare`` reads the sweep.

Re-running a job skips only the same work (repopt/rundir.py): a stage is skipped when its result
says completed, its recorded config equals the one asked for and every file of its manifest is
there with its sha256; a completed stage whose files are damaged or missing runs again (resumed
from its checkpoint). The hand-off is checked, not assumed: ``searched`` trains with exactly the
scales file stage one recorded (by sha256), found in this job's ``hs/`` (a moved sweep resumes).

After stage two come the optional steps on the target run, each skipped when its result file is
there (the job's settings, these steps' included, were checked against the recorded ones before
anything ran): ``export`` (quant.json), ``export_per_tensor`` (``ptq_per_tensor``:
quant-per_tensor.json), ``qat`` (qat.json) and ``prune`` (pruned/metrics.json).

This module is the app; the job is ``pipelines/job.py``. The settings are checked before it (and
torch) loads.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from repopt.app import run_app
from repopt.results import JobMetrics

from .config import PipelineConfig


def run(cfg: PipelineConfig, job_dir: Path) -> JobMetrics:
    """The job, imported only now: the config was checked before torch loads."""
    from .job import run_pipeline

    return run_pipeline(cfg, job_dir)


@hydra.main(version_base="1.3", config_path="pkg://repopt.conf", config_name="search_and_train")
def main(cfg: DictConfig):
    return run_app(cfg, PipelineConfig, run, JobMetrics)


if __name__ == "__main__":
    main()
