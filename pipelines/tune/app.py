"""Optuna over pipeline jobs: ``python -m pipelines.tune tune=<space>`` (``repopt-tune``).

Each trial composes the pipeline config (``conf/search_and_train.yaml``) from the study's base
overrides and the values it samples, validates it with ``PipelineConfig`` and runs one pipeline job
in ``<study_dir>/trial_<n>/``; the objective is the target's test top-1 (or several objectives,
``objectives=[top1,images_per_sec]``). Per-epoch test top-1 goes to the pruner, which can stop a
trial in either stage. The study lives in a database (default: SQLite ``<study_dir>/study.db``):
running the same command again continues it, ``n_trials`` is the study's total, and a completed or
pruned trial is never run again. Several workers (processes, machines, SLURM array tasks) share a
study through one ``storage=<URL>`` and take trials one at a time (``ClaimLock``: a file lock on
SQLite, an advisory lock on PostgreSQL); a trial whose worker died (no heartbeat for ``grace_period``
seconds) or was stopped by a signal is failed and re-run, with the same parameters, as a new trial.
At the end ``<study_dir>/study.md`` and ``history.png`` describe the study;
``python -m pipelines.compare <study_dir>`` tables the trials as jobs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path

import hydra
from omegaconf import DictConfig

from repopt.app import prepare_run_dir, run_guarded
from repopt.config import to_typed
from repopt.errors import ConfigError, Interrupted

from .claim import ClaimLock
from .config import TuneConfig
from .report import sync_trial_files, write_report
from .storage import make_pruner, make_sampler, make_storage, reading_study, require_optuna, storage_text, storage_url
from .trial import TrialFailed, TrialRunner, check_space

log = logging.getLogger("pipelines.tune")


def next_action(study, n_trials: int) -> str:
    """``claim`` (a queued re-run, or a new trial while the study has fewer than ``n_trials``),
    ``wait`` (nothing to claim, but trials are running: one may die and need a re-run) or ``done``.
    Every trial counts except one that was re-run (its re-run takes its place)."""
    import optuna

    State = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    rerun = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    counted = sum(t.number not in rerun for t in trials)
    if any(t.state == State.WAITING for t in trials) or counted < n_trials:
        return "claim"
    return "wait" if any(t.state == State.RUNNING for t in trials) else "done"


def retry_stopped(study, cfg: TuneConfig, number: int | None) -> None:
    """A trial this worker ran was stopped by a signal (FAIL): queue it again, as a dead worker's is."""
    optuna = require_optuna()
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is None or trial.state != optuna.trial.TrialState.FAIL:
        return
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry)(study, trial)
    log.warning("trial %d was stopped: it runs again, as a new trial, when the study continues", number)


def work(study, cfg: TuneConfig, runner: TrialRunner, claim: ClaimLock) -> None:
    """Run trials until the study has its ``n_trials`` and none is running."""
    optuna = require_optuna()
    waiting = False
    while True:
        claim.acquire()
        try:
            optuna.storages.fail_stale_trials(study)
            action = next_action(study, cfg.n_trials)
            if action == "done":
                return
            if action == "wait":
                claim.release()
                if not waiting:
                    log.info("no trial left to claim: waiting for the running trials of other workers")
                waiting = True
                time.sleep(cfg.poll_seconds)
                continue
            waiting = False
            study.optimize(runner, n_trials=1, catch=(TrialFailed,), callbacks=[runner.after_trial], gc_after_trial=True)
            runner.current = None  # finished and stored: nothing of this worker's is running
        except BaseException as exc:
            claim.release()
            stopped = isinstance(exc, (Interrupted, KeyboardInterrupt))
            try:
                if stopped:
                    retry_stopped(study, cfg, runner.current)
                sync_trial_files(study, runner.study_dir)
            except Exception as inner:  # the storage may be what failed: keep the original error
                log.warning("could not update the study after the error: %s", inner)
            if isinstance(exc, Interrupted) and runner.current is not None:
                raise Interrupted(
                    f"study {cfg.study_name} stopped during trial {runner.current} ({exc}); run the same "
                    f"command again to continue it (that trial runs again)"
                ) from exc
            raise
        finally:
            claim.release()


def _settings(cfg: TuneConfig) -> dict:
    """What a study is: a continued study must have the same."""
    return {
        "space": {k: dataclasses.asdict(v) for k, v in cfg.space.items()},
        "base": list(cfg.base),
        "objectives": list(cfg.objectives),
        "directions": list(cfg.directions),
    }


def check_same_study(study, cfg: TuneConfig, url: str) -> None:
    wanted, key = _settings(cfg), "repopt_tune"
    stored = study.user_attrs.get(key)
    if stored is None:
        study.set_user_attr(key, wanted)
        return
    changed = [name for name in wanted if stored.get(name) != wanted[name]]
    if changed:
        raise ConfigError(
            f"study {cfg.study_name} in {storage_text(url)} was created with another "
            f"{', '.join(changed)} ({'; '.join(f'{n}: {stored.get(n)}' for n in changed)}); continue it with "
            f"the same settings, or start a new study with study_name=... (or study_dir=...)"
        )


def run_study(cfg: TuneConfig):
    """Create or continue the study, run trials until it has ``n_trials``, write ``study.md``."""
    require_optuna()
    study_dir = prepare_run_dir(cfg.study_dir or Path("outputs") / "tune" / cfg.study_name)
    check_space(cfg)
    url = storage_url(cfg, study_dir)
    claim = ClaimLock(url, cfg.study_name)
    try:
        return _run_claimed(cfg, study_dir, url, claim)
    finally:
        claim.close()


def _run_claimed(cfg: TuneConfig, study_dir: Path, url: str, claim: ClaimLock):
    optuna = require_optuna()
    with claim, reading_study(url):  # creating the tables and the study: one worker at a time
        storage = make_storage(cfg, url)
        study = optuna.create_study(
            study_name=cfg.study_name,
            storage=storage,
            directions=list(cfg.directions),
            load_if_exists=True,
            sampler=make_sampler(cfg.sampler, cfg.sampler.seed),
            pruner=make_pruner(cfg.pruner),
        )
        if [d.name.lower() for d in study.directions] != list(cfg.directions):
            raise ConfigError(
                f"study {cfg.study_name} optimizes {[d.name.lower() for d in study.directions]}, not "
                f"directions={list(cfg.directions)}; start a new study with study_name=..."
            )
        check_same_study(study, cfg, url)
    found = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    log.info(
        "study %s in %s, n_trials=%d: %s",
        cfg.study_name,
        storage_text(url),
        cfg.n_trials,
        ", ".join(f"{n} {s}" for s, n in sorted(found.items())) or "no trials yet",
    )
    runner = TrialRunner(cfg, study_dir, claim, make_sampler=lambda seed: make_sampler(cfg.sampler, seed))
    work(study, cfg, runner, claim)
    report = write_report(study, cfg, study_dir, url)
    log.info("study %s: %s", cfg.study_name, report)
    return study


@hydra.main(version_base="1.3", config_path="pkg://repopt.conf", config_name="tune")
def main(cfg: DictConfig):
    run_guarded(lambda: run_study(to_typed(cfg, TuneConfig)))


if __name__ == "__main__":
    main()
