"""Experiment tracking: ``logger=none|tensorboard|mlflow`` (``LoggerConfig``, ``conf/logger/``).

A tracker is a ``Callback`` (engine/callbacks.py): after every epoch it sends the epoch's
``history.csv`` row (and, in stage one, the learned scales per stage) to TensorBoard or MLflow.
The apps' training functions are wrapped in ``tracked(...)``, which opens the tracker before any
work (a missing package is a ``ConfigError`` then), attaches it to the trainers created inside and,
when the function returns or raises, logs the final metrics and files and closes the run with the
result's status. Only rank 0 writes. The run directory stays the record: a tracker that fails logs
one warning and stops, and never touches ``metrics.json`` or ``history.csv``.

* ``tensorboard``: event files in ``<run_dir>/tb/``.
* ``mlflow``: one run per stage; inside ``pipelines.search_and_train`` the stages' runs are nested
  under the job's run (tag ``mlflow.parentRunId``). ``tracking_uri: null`` is
  ``sqlite:///<outputs>/mlflow.db``, ``<outputs>`` being the nearest folder named ``outputs`` that
  holds the run directory (``./outputs`` when none does). The run's id is kept in
  ``<run_dir>/mlflow_run.json`` so that ``resume=true`` continues the same run.

Neither library is imported unless it is chosen.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .config import LoggerConfig, to_plain
from .engine.callbacks import Callback
from .errors import ConfigError
from .io import read_json, sqlite_file, write_json
from .results import JobMetrics, Status, status_of

log = logging.getLogger(__name__)

# history.csv columns sent per epoch (step = epoch), under the same names
EPOCH_METRICS = ("train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "lr", "images_per_sec", "epoch_seconds")
# final values of a result (metrics.json) sent when the run ends
FINAL_METRICS = ("top1", "top5", "loss", "best_top1", "hs_top1", "wall_seconds", "train_seconds", "images_per_sec")
MLFLOW_STATUS = {
    Status.COMPLETED: "FINISHED",
    Status.INTERRUPTED: "KILLED",
    Status.PRUNED: "KILLED",
}  # every other status: FAILED
RUN_FILE = "mlflow_run.json"
INSTALL = 'pip install -e ".[track]"'
_MODULES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "mlflow": ("mlflow",)}
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value

ScalesOf = Callable[[Any], Mapping[str, Any]]  # model -> {"stage2": tensor of |s| values, ...}


def require_backend(name: str) -> None:
    """Import the libraries ``logger=name`` needs; a missing one is one clear ``ConfigError``."""
    for module in _MODULES.get(name, ()):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(
                f"logger={name} needs the {name} package, which cannot be imported ({exc}); install it "
                f"with {INSTALL} (or pip install {name}), or use logger=none"
            ) from None


def outputs_dir(run_dir: Path) -> Path:
    """The nearest folder named ``outputs`` holding ``run_dir``; ``./outputs`` when there is none."""
    run_dir = Path(run_dir).resolve()
    for folder in (run_dir, *run_dir.parents):
        if folder.name == "outputs":
            return folder
    return Path.cwd().resolve() / "outputs"


def tracking_uri(cfg: LoggerConfig, run_dir: Path) -> str:
    """``logger.tracking_uri``, or the default SQLite store under the run's ``outputs/``."""
    return cfg.tracking_uri or f"sqlite:///{outputs_dir(run_dir) / 'mlflow.db'}"


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}`` (empty dicts stay as values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # torchrun's rank, as resolve_runtime reads it


class Tracker(Callback):
    """The tracker of ``logger=none`` (and of every rank but 0): does nothing. Subclasses implement
    ``_log_epoch``, ``_finish`` and ``_close``; every call is guarded by ``_safely``."""

    enabled = False

    def __init__(self, scales_of: ScalesOf | None = None):
        self.scales_of = scales_of
        self.broken = False

    def on_epoch_end(self, trainer, row: dict) -> None:
        if not self.enabled or self.broken or not trainer.runtime.is_main:
            return
        epoch = int(row["epoch"])
        values = {k: float(row[k]) for k in EPOCH_METRICS if _finite(row.get(k))}
        self._safely("epoch metrics", lambda: self._log_epoch(epoch, values, self._scales(trainer.model)))

    def _scales(self, model) -> dict:
        if self.scales_of is None:
            return {}
        try:
            return dict(self.scales_of(model))
        except Exception as exc:  # a summary of the scales must never stop training
            log.warning("could not summarize the scales for tracking: %s", exc)
            return {}

    def finish(self, status: Status, result=None, files: Iterable[Path] = (), error: str | None = None) -> None:
        """Log the final metrics and ``files``, then close the run with ``status``."""
        if not self.enabled:
            return
        if not self.broken:
            final = {k: float(getattr(result, k)) for k in FINAL_METRICS if _finite(getattr(result, k, None))}
            if isinstance(result, JobMetrics) and _finite(result.wall_seconds.get("total")):
                final["wall_seconds"] = float(result.wall_seconds["total"])
            epochs = int(getattr(result, "epochs", 0) or 0)
            self._safely(
                "final metrics and files", lambda: self._finish(status, final, epochs, [f for f in files if f.is_file()], error)
            )
        self._safely("closing the run", lambda: self._close(status), force=True)

    def _safely(self, what: str, action: Callable[[], None], force: bool = False) -> None:
        if self.broken and not force:
            return
        try:
            action()
        except Exception as exc:
            if not self.broken:
                log.warning(
                    "%s: %s failed (%s: %s); metrics.json and history.csv in the run directory are unaffected, "
                    "tracking is off for the rest of this run",
                    type(self).__name__,
                    what,
                    type(exc).__name__,
                    exc,
                )
            self.broken = True

    def _log_epoch(self, epoch: int, values: dict[str, float], scales: dict) -> None:
        pass

    def _finish(self, status: Status, final: dict[str, float], epochs: int, files: list[Path], error: str | None) -> None:
        pass

    def _close(self, status: Status) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files in ``<run_dir>/tb/``: the epoch's scalars; per stage, a histogram of |s| and its mean."""

    enabled = True

    def __init__(self, run_dir: Path, scales_of: ScalesOf | None = None):
        super().__init__(scales_of)
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tb"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def _log_epoch(self, epoch, values, scales):
        for key, value in values.items():
            self.writer.add_scalar(key, value, epoch)
        for stage, abs_values in scales.items():
            self.writer.add_histogram(f"scales/{stage}", abs_values, epoch)
            self.writer.add_scalar(f"scales_abs_mean/{stage}", float(abs_values.mean()), epoch)
        self.writer.flush()

    def _finish(self, status, final, epochs, files, error):
        self.writer.add_text("status", str(status) + (f": {error}" if error else ""), epochs)

    def _close(self, status):
        self.writer.close()


class MLflowTracker(Tracker):
    """One MLflow run: params = the flattened config, metrics per epoch (step = epoch), the run's files."""

    enabled = True

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        stage: str,
        config: dict,
        resume: bool = False,
        scales_of: ScalesOf | None = None,
        parent: "MLflowTracker | None" = None,
        record: str = RUN_FILE,
    ):
        super().__init__(scales_of)
        from mlflow.tracking import MlflowClient

        self.cfg, self.run_dir, self.stage, self.record = cfg, Path(run_dir), stage, Path(run_dir) / record
        self.uri = tracking_uri(cfg, run_dir)
        db = sqlite_file(self.uri)
        try:
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment(db)
            self.run_id = self._open_run(config, resume, parent)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"logger=mlflow could not open a run in {self.uri} ({type(exc).__name__}: {str(exc)[:300]}); "
                f"fix logger.tracking_uri or use logger=none"
            ) from None
        log.info("MLflow run %s (experiment %r) in %s", self.run_id, cfg.experiment, self.uri)

    def _experiment(self, db: Path | None) -> str:
        from mlflow.exceptions import MlflowException

        name = self.cfg.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = self.cfg.artifact_location or (str(db.parent / "mlartifacts") if db is not None else None)
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except MlflowException:  # another job created it at the same moment
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            raise ConfigError(f"logger.experiment={name!r} is deleted in {self.uri}; restore it or choose another name")
        return experiment.experiment_id

    def _open_run(self, config: dict, resume: bool, parent: "MLflowTracker | None") -> str:
        from mlflow.entities import Param

        record = read_json(self.record) if resume else None
        if isinstance(record, dict) and record.get("tracking_uri") == self.uri and record.get("run_id"):
            with contextlib.suppress(Exception):  # the run may have been deleted: start a new one
                run = self.client.get_run(record["run_id"])
                if run.info.lifecycle_stage == "active" and run.data.tags.get("repopt.stage") == self.stage:
                    self.client.update_run(run.info.run_id, status="RUNNING")
                    log.info("resume: continuing MLflow run %s", run.info.run_id)
                    return run.info.run_id
        tags = {"repopt.stage": self.stage, "repopt.run_dir": str(self.run_dir)}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent.run_id
        name = self.stage if parent is not None else f"{self.stage} {self.run_dir.parent.name}/{self.run_dir.name}"
        run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id
        params = [Param(k, (str(v) if v is not None else "null")[:MAX_PARAM_LENGTH]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[i : i + 100])
        write_json(self.record, {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "run_id": run_id})
        return run_id

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def _log_epoch(self, epoch, values, scales):
        values = dict(values)
        for stage, abs_values in scales.items():
            values[f"scales_abs_mean/{stage}"] = float(abs_values.mean())
        self._metrics(values, epoch)

    def _finish(self, status, final, epochs, files, error):
        if final:
            self._metrics(final, epochs)
        if error:
            self.client.set_tag(self.run_id, "repopt.error", error[:5000])
        self.client.set_tag(self.run_id, "repopt.status", str(status))
        if self.cfg.artifacts:
            for path in files:
                self.client.log_artifact(self.run_id, str(path))

    def _close(self, status):
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FAILED"))


_OPEN: list[Tracker] = []  # the trackers of the functions running now, innermost last (the pipeline's job run first)


def _push(tracker: Tracker) -> None:
    """Enter ``tracker`` in ``_OPEN``. The wrapper of ``tracked`` goes through these two functions and
    never names ``_OPEN``: wrapping a function of ``__main__`` (``python -m pipelines.search_and_train``
    under the joblib or submitit launcher) it is pickled by value, with a copy of each global it names,
    and a job's run entered in a copy of the list would be unseen by its stages (no nesting)."""
    _OPEN.append(tracker)


def _pop(tracker: Tracker) -> None:
    _OPEN.remove(tracker)


def open_tracker(
    cfg: LoggerConfig,
    run_dir: Path,
    stage: str,
    config: dict | None = None,
    resume: bool = False,
    scales_of: ScalesOf | None = None,
) -> Tracker:
    """The tracker ``cfg`` asks for; a ``Tracker`` that does nothing for ``none`` and on ranks other than 0.

    An MLflow run opened while the run of a pipeline job is open, in the same store, is nested under it.
    """
    if cfg.name == "none":
        return Tracker()
    require_backend(cfg.name)  # on every rank: all of them fail alike, before any work
    if not _is_main():
        return Tracker()
    if cfg.name == "tensorboard":
        return TensorBoardTracker(run_dir, scales_of if cfg.scales else None)
    uri = tracking_uri(cfg, run_dir)
    parent = next((t for t in reversed(_OPEN) if isinstance(t, MLflowTracker) and t.uri == uri and not t.broken), None)
    return MLflowTracker(cfg, run_dir, stage, config or {}, resume, scales_of if cfg.scales else None, parent)


def tracked(
    stage: str, files: Sequence[str] = ("metrics.json", "history.csv"), scales_of: ScalesOf | None = None, attach: bool = True
):
    """Wrap an app's ``train(cfg, run_dir) -> result`` with the tracker of ``cfg.logger``.

    ``files``: the run directory's files logged as artifacts when it ends (those that exist).
    ``attach``: hand the tracker to ``train`` as ``callbacks=[tracker]``, which it gives the trainer it
    builds (false for the pipeline job, whose stages have their own runs). ``cfg.logger`` missing or ``none``: ``train`` runs as it is.
    """

    def wrap(train):
        @functools.wraps(train)
        def run(cfg, run_dir, **kwargs):
            logger = getattr(cfg, "logger", None)
            if logger is None or logger.name == "none":
                return train(cfg, run_dir, **kwargs)
            if not attach and logger.name == "tensorboard":  # nothing of its own to plot: its stages write their tb/
                require_backend(logger.name)
                return train(cfg, run_dir, **kwargs)
            run_dir = Path(run_dir)
            tracker = open_tracker(logger, run_dir, stage, to_plain(cfg), bool(getattr(cfg, "resume", False)), scales_of)
            status, result, error = Status.FAILED, None, None
            _push(tracker)
            try:
                if attach:  # the tracker sees every epoch of the trainer the app builds
                    kwargs["callbacks"] = [*kwargs.get("callbacks", ()), tracker]
                result = train(cfg, run_dir, **kwargs)
                status = getattr(result, "status", Status.COMPLETED)
                return result
            except Exception as exc:
                status, error = status_of(exc), f"{type(exc).__name__}: {exc}"
                raise
            except BaseException:  # Ctrl-C
                status, error = Status.INTERRUPTED, "interrupted by the user"
                raise
            finally:
                _pop(tracker)
                tracker.finish(status, result, [run_dir / f for f in files], error)

        return run

    return wrap


def log_files(cfg: LoggerConfig, folder: Path, name: str, files: Iterable[Path], params: dict | None = None) -> str:
    """A finished MLflow run ``name`` holding ``files`` (those that exist) as artifacts, e.g. a sweep's
    comparison; run again, it updates the run recorded in ``folder/mlflow_<name>_run.json``. Returns its id."""
    require_backend("mlflow")
    tracker = MLflowTracker(cfg, Path(folder), name, params or {}, resume=True, record=f"mlflow_{name}_run.json")
    tracker.finish(Status.COMPLETED, None, [Path(f) for f in files])
    return tracker.run_id
