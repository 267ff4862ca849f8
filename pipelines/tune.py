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

import contextlib
import dataclasses
import logging
import time
import warnings
from collections import Counter
from pathlib import Path

import hydra
from omegaconf import DictConfig

from repopt.app import prepare_run_dir, run_guarded
from repopt.config import to_typed
from repopt.errors import ConfigError, Interrupted

from .tune_config import PrunerConfig, SamplerConfig, TuneConfig
from .tune_report import storage_text, sync_trial_files, write_report
from .tune_trial import TrialFailed, TrialRunner, check_space

log = logging.getLogger("pipelines.tune")


def require_optuna():
    """Optuna, or the one-line error that says how to install it (the ``[tune]`` extra)."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("pipelines.tune needs Optuna: pip install 'repopt-pipeline[tune]' (or 'optuna>=5.0')") from None
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, retry callback
    optuna.logging.disable_default_handler()  # Optuna's messages go to the app's log (and tune.log)
    optuna.logging.enable_propagation()
    return optuna


# ------------------------------------------------------------------ storage, sampler, pruner


def storage_url(cfg: TuneConfig, study_dir: Path) -> str:
    return cfg.storage or f"sqlite:///{study_dir / 'study.db'}"


def _sqlite_file(url: str) -> Path | None:
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return Path(database).resolve() if database and database != ":memory:" else None


def make_storage(cfg: TuneConfig, url: str):
    """An ``RDBStorage`` with a heartbeat: a running trial that stops beating for ``grace_period``
    seconds is failed and queued again with its parameters (``RetryHeartbeatStaleTrialCallback``)."""
    optuna = require_optuna()
    sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": cfg.db_timeout}} if sqlite else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry))
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError) as exc:
        raise cannot_open(url, exc) from None


def cannot_open(url: str, exc: Exception) -> ConfigError:
    return ConfigError(f"storage={storage_text(url)}: cannot open it ({type(exc).__name__}: {exc}); give an "
                       f"SQLAlchemy URL (sqlite:///path.db, postgresql://user@host/db) whose driver is installed")


def make_sampler(cfg: SamplerConfig, seed: int | None):
    optuna = require_optuna()
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(n_startup_trials=cfg.n_startup_trials, seed=seed)


def make_pruner(cfg: PrunerConfig):
    optuna = require_optuna()
    if cfg.name == "none":
        return optuna.pruners.NopPruner()
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps,
                                           interval_steps=cfg.interval_steps)
    if cfg.name == "threshold":
        inner = optuna.pruners.ThresholdPruner(lower=cfg.lower, upper=cfg.upper, n_warmup_steps=cfg.n_warmup_steps,
                                               interval_steps=cfg.interval_steps)
    else:
        inner = optuna.pruners.HyperbandPruner(min_resource=cfg.min_resource, max_resource=cfg.max_resource or "auto",
                                               reduction_factor=cfg.reduction_factor)
    return _after_startup(inner, cfg.n_startup_trials) if cfg.n_startup_trials else inner


def _after_startup(inner, n: int):
    """``inner``, asked only once ``n`` trials of the study have completed (as MedianPruner's own
    ``n_startup_trials``): the first trials always run to the end."""
    import optuna

    class AfterStartup(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            return len(done) >= n and inner.prune(study, trial)

    return AfterStartup()


# ------------------------------------------------------------------ claiming trials


class ClaimLock:
    """Lets one worker at a time fail stale trials, count the budget and take a trial, so that workers
    that claim at the same instant never overshoot ``n_trials``; the same lock guards creating the
    study. Re-entrant release: the objective releases it as soon as Optuna has handed out its trial.

    * SQLite: a file lock beside the database (the workers share one machine).
    * PostgreSQL: a session advisory lock in the database itself (``pg_advisory_lock``, its key
      derived from the study name), taken on a connection of its own: exclusive across machines,
      and a worker that dies loses its connection, so the server drops its lock.
    * Other databases: no lock (a warning says so once); two workers that claim at the same instant
      can overshoot ``n_trials`` by one.
    """

    def __init__(self, url: str, study_name: str):
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            backend = make_url(url).get_backend_name()
        except (ArgumentError, ValueError):  # not a URL: make_storage says so
            backend = None
        database = _sqlite_file(url)
        self._file = open(database.with_name(database.name + ".lock"), "a") if database else None
        self._advisory = _AdvisoryLock(url, study_name) if backend == "postgresql" else None
        if backend not in (None, "sqlite", "postgresql", *_UNLOCKED_WARNED):
            _UNLOCKED_WARNED.add(backend)
            log.warning("storage backend %s: claims are not exclusive (a lock is taken for SQLite and PostgreSQL "
                        "only), so workers that claim at the same instant can overshoot n_trials", backend)
        self._held = False

    def acquire(self) -> None:
        if self._held:
            return
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_EX)
            self._held = True
        elif self._advisory is not None:
            self._advisory.acquire()
            self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
        else:
            self._advisory.release()

    def close(self) -> None:
        """Release the lock and let go of its file or connection."""
        self.release()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._advisory is not None:
            self._advisory.close()
            self._advisory = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


_UNLOCKED_WARNED: set[str] = set()  # backends whose missing lock was already reported by this process


def advisory_key(study_name: str) -> int:
    """The study's advisory-lock key: a signed 64-bit integer (``pg_advisory_lock(bigint)``), the
    same on every machine and Python (not ``hash()``, which is salted per process)."""
    import hashlib

    digest = hashlib.sha256(f"repopt.tune:{study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class _AdvisoryLock:
    """``pg_advisory_lock(key)`` on one dedicated connection in autocommit, so no transaction stays
    open between claims. The connection asks the server for TCP keepalives: a worker whose machine
    vanished while holding the lock is noticed in about a minute, not after the system's two hours."""

    KEEPALIVES = (("tcp_keepalives_idle", 30), ("tcp_keepalives_interval", 10), ("tcp_keepalives_count", 3))

    def __init__(self, url: str, study_name: str):
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.url, self.key = url, advisory_key(study_name)
        try:
            self._engine = create_engine(url, poolclass=NullPool)
        except (ImportError, ValueError) as exc:  # no driver, a bad URL
            raise cannot_open(url, exc) from None
        self._connection = None

    def _connect(self):
        from sqlalchemy import exc, text

        if self._connection is None or self._connection.closed or self._connection.invalidated:
            self._drop_connection()
            try:
                connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            except exc.OperationalError as error:  # no server there, refused, wrong password
                raise cannot_open(self.url, error.orig or error) from None
            for name, value in self.KEEPALIVES:  # ignored on a Unix socket
                connection.execute(text(f"SET {name} = {int(value)}"))
            self._connection = connection
        return self._connection

    def acquire(self) -> None:
        from sqlalchemy import exc, text

        statement = text("SELECT pg_advisory_lock(:key)")
        try:
            self._connect().execute(statement, {"key": self.key})
        except exc.DBAPIError as error:
            if not error.connection_invalidated:
                raise
            self._connect().execute(statement, {"key": self.key})  # the connection had dropped: once more on a new one

    def release(self) -> None:
        from sqlalchemy import exc, text

        try:
            if not self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key}).scalar():
                log.warning("the claim lock was no longer held: its connection to the database had dropped")
        except exc.SQLAlchemyError as error:  # closing the connection releases the lock on the server
            log.warning("could not release the claim lock (%s); dropping its connection instead", error)
            self._drop_connection()

    def _drop_connection(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    def close(self) -> None:
        self._drop_connection()
        self._engine.dispose()


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
                raise Interrupted(f"study {cfg.study_name} stopped during trial {runner.current} ({exc}); run the same "
                                  f"command again to continue it (that trial runs again)") from exc
            raise
        finally:
            claim.release()


def _settings(cfg: TuneConfig) -> dict:
    """What a study is: a continued study must have the same."""
    return {"space": {k: dataclasses.asdict(v) for k, v in cfg.space.items()}, "base": list(cfg.base),
            "objectives": list(cfg.objectives), "directions": list(cfg.directions)}


def check_same_study(study, cfg: TuneConfig, url: str) -> None:
    wanted, key = _settings(cfg), "repopt_tune"
    stored = study.user_attrs.get(key)
    if stored is None:
        study.set_user_attr(key, wanted)
        return
    changed = [name for name in wanted if stored.get(name) != wanted[name]]
    if changed:
        raise ConfigError(f"study {cfg.study_name} in {storage_text(url)} was created with another "
                          f"{', '.join(changed)} ({'; '.join(f'{n}: {stored.get(n)}' for n in changed)}); continue it with "
                          f"the same settings, or start a new study with study_name=... (or study_dir=...)")


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
    with claim:  # creating the tables and the study: one worker at a time
        storage = make_storage(cfg, url)
        study = optuna.create_study(study_name=cfg.study_name, storage=storage, directions=list(cfg.directions),
                                    load_if_exists=True, sampler=make_sampler(cfg.sampler, cfg.sampler.seed),
                                    pruner=make_pruner(cfg.pruner))
        if [d.name.lower() for d in study.directions] != list(cfg.directions):
            raise ConfigError(f"study {cfg.study_name} optimizes {[d.name.lower() for d in study.directions]}, not "
                              f"directions={list(cfg.directions)}; start a new study with study_name=...")
        check_same_study(study, cfg, url)
    found = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    log.info("study %s in %s, n_trials=%d: %s", cfg.study_name, storage_text(url), cfg.n_trials,
             ", ".join(f"{n} {s}" for s, n in sorted(found.items())) or "no trials yet")
    runner = TrialRunner(cfg, study_dir, claim, make_sampler=lambda seed: make_sampler(cfg.sampler, seed))
    work(study, cfg, runner, claim)
    report = write_report(study, cfg, study_dir, url)
    log.info("study %s: %s", cfg.study_name, report)
    return study


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="tune")
def main(cfg: DictConfig):
    run_guarded(lambda: run_study(to_typed(cfg, TuneConfig)))


if __name__ == "__main__":
    main()
