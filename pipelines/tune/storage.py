"""The Optuna objects a study is made of, built from its config: storage, sampler, pruner."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import warnings
from pathlib import Path

from repopt.errors import ConfigError
from repopt.io import sqlite_file

from .config import PrunerConfig, SamplerConfig, TuneConfig

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


def make_storage(cfg: TuneConfig, url: str):
    """An ``RDBStorage`` with a heartbeat: a running trial that stops beating for ``grace_period``
    seconds is failed and queued again with its parameters (``RetryHeartbeatStaleTrialCallback``)."""
    optuna = require_optuna()
    sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": cfg.db_timeout}} if sqlite else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=cfg.heartbeat_interval,
            grace_period=cfg.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry),
        )
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError) as exc:
        raise cannot_open(url, exc) from None


@contextlib.contextmanager
def reading_study(url: str):
    """Opening a study whose SQLite file is damaged (truncated, overwritten, not a database) ends in
    SQLAlchemy's traceback, from the first statement on; this turns it into the project's one line."""
    from sqlalchemy.exc import DatabaseError

    try:
        yield
    except DatabaseError as exc:
        path = sqlite_file(url)
        # exactly sqlite3.DatabaseError: SQLITE_NOTADB / SQLITE_CORRUPT ("file is not a database",
        # "database disk image is malformed"); its subclasses (OperationalError: locked, no such table...) are not damage
        if path is None or type(exc.orig) is not sqlite3.DatabaseError:
            raise
        raise ConfigError(
            f"cannot read the study in {path} ({exc.orig}): the file is damaged or not an SQLite database; "
            f"restore it from a backup, or move it away to start a new study (its trial_<n>/ folders too, "
            f"or choose another study_dir=...)"
        ) from None


def storage_text(url: str) -> str:
    """The storage URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: show its scheme only
        return url.split("://", 1)[0] + "://..."


def cannot_open(url: str, exc: Exception) -> ConfigError:
    return ConfigError(
        f"storage={storage_text(url)}: cannot open it ({type(exc).__name__}: {exc}); give an "
        f"SQLAlchemy URL (sqlite:///path.db, postgresql://user@host/db) whose driver is installed"
    )


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
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps, interval_steps=cfg.interval_steps
        )
    if cfg.name == "threshold":
        inner = optuna.pruners.ThresholdPruner(
            lower=cfg.lower, upper=cfg.upper, n_warmup_steps=cfg.n_warmup_steps, interval_steps=cfg.interval_steps
        )
    else:
        inner = optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_resource, max_resource=cfg.max_resource or "auto", reduction_factor=cfg.reduction_factor
        )
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
