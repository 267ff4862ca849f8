"""What every Hydra app of the project does around its training function.

* turns Hydra's config into the typed schema (unknown keys / wrong types fail before any work);
* finds the run directory (Hydra's output dir, or ``run_dir=``) and checks it is writable;
* takes the run directory's lock, refuses a directory whose work was done with other settings
  (repopt/rundir.py), removes the temporary files of writes a killed process left, and only then
  writes the resolved config (``.hydra/``: the root configs set ``hydra.output_subdir: null`` so
  that Hydra does not rewrite it before these checks);
* maps outcomes to ``metrics.json`` statuses and exit codes: ``completed``; ``diverged`` and
  ``interrupted`` (written by the trainer); ``failed`` for bad input or a crash. A bad-input error
  prints one clear line, not a traceback; a refused run (``RunRefused``) changes nothing on disk.
  In a multirun sweep a failed or interrupted job is recorded and returned (the sweep's summary and
  exit code: repopt/sweep.py); a single run exits non-zero. The ``error:`` line is printed once on
  the terminal and written to the run's log file (``log_to_files``), not logged to the console too;
* ``OutputDirCheck`` (a Hydra callback in every root config) turns an output directory Hydra cannot
  create into that one ``error:`` line as well.

``run_app`` does all of this for a training run; ``run_step`` the checks and outcomes for a step on a
finished run (export, prune, QAT). This module does not import torch: the apps check their settings
before their training code (and torch) loads.
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import to_plain, to_typed
from .errors import CheckpointError, ConfigError, Interrupted, RepOptError, ScalesError
from .io import write_bytes, write_text
from .results import Result, StageMetrics, Status, record_failure, status_of
from .rundir import SETTINGS_ALLOWED, RunLock, RunRefused, check_same_work, holds_work, is_main_process, remove_stale_temps
from .scheduler import being_requeued

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

EXIT_FAILED, EXIT_INTERRUPTED = 1, 130


def hydra_run_dir() -> Path | None:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return None


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def log_to_files(logger: logging.Logger, level: int, msg: str, *args) -> None:
    """Log to the file handlers only (the run's ``<job>.log``) a message already printed on the terminal.

    Hydra's job logging sends each record to the console (stdout) and the log file, so logging a line
    that is also printed on stderr showed it twice on a terminal."""
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(logger.name, level, "(unknown file)", 0, msg, args, None)
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)
        current = current.parent if current.propagate else None


def report_error(message: str, logged: str | None = None) -> None:
    """The one ``error: <message>`` line on stderr; ``logged`` (default: the message) goes to the log file."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    log_to_files(log, logging.ERROR, "%s", message if logged is None else logged)


def _fix_hint(config: DictConfig, key: str) -> str:
    """The setting that moves the output directory: ``study_dir=`` when ``key`` is just ``${study_dir}``
    (pipelines.tune), else ``key`` itself (``hydra.run.dir`` / ``hydra.sweep.dir``)."""
    parent, _, leaf = key.rpartition(".")
    raw = OmegaConf.to_container(OmegaConf.select(config, parent), resolve=False).get(leaf)
    match = re.fullmatch(r"\$\{([A-Za-z_][\w.]*)\}", str(raw))
    return match.group(1) if match and not match.group(1).startswith("hydra.") else key


class OutputDirCheck(Callback):
    """Create Hydra's output directory before Hydra does, and turn a failure into one ``error:`` line.

    Hydra makes ``hydra.run.dir`` in ``run_job`` (``hydra/core/utils.py``), ``hydra.sweep.dir`` in the
    launcher, before any code of the app runs, and a directory it cannot create (under ``/proc``, on a
    read-only disk, an existing file) or write its log file into ended there in a double traceback. ``on_run_start`` and
    ``on_multirun_start`` run just before, with the same config object (``${now:...}`` is resolved
    once per config and cached: the same path). ``SystemExit`` passes Hydra's callback wrapper, which
    turns other exceptions into warnings. Registered as ``hydra.callbacks.output_dir_check`` in every
    root config."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._create(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._create(config, "hydra.sweep.dir")

    @staticmethod
    def _create(config: DictConfig, key: str) -> None:
        try:
            path = OmegaConf.select(config, key)
        except Exception:  # it does not resolve here: Hydra reports it as it does today
            return
        if path is None:
            return
        folder = Path(str(path))
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            problem = "is a file, not a directory"
        except OSError as exc:
            problem = f"cannot be created ({exc.strerror or exc})"
        else:
            try:  # an existing directory Hydra cannot write its <job>.log into (/proc, a read-only disk)
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
                    return
            except OSError as exc:
                problem = f"is not writable ({exc.strerror or exc})"
        setting = _fix_hint(config, key)
        report_error(f"output directory {folder.absolute()} ({setting}) {problem}; choose another with {setting}=...")
        raise SystemExit(EXIT_FAILED)


def prepare_run_dir(path: str | Path) -> Path:
    """Create the run directory and prove it is writable before any training starts."""
    run_dir = Path(path).expanduser().resolve()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):  # unique: DDP ranks probe at once
            pass
    except OSError as exc:
        raise ConfigError(
            f"run directory {run_dir} is not writable ({exc.strerror}); choose another with run_dir=... or hydra.run.dir=..."
        ) from None
    return run_dir


SNAPSHOT_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def recorded_snapshot(run_dir: Path) -> dict[Path, bytes]:
    """The ``.hydra/`` files as they are now (to put back when a check inside the task refuses the run)."""
    paths = [run_dir / ".hydra" / name for name in SNAPSHOT_FILES]
    return {path: path.read_bytes() for path in paths if path.is_file()}


def write_config_snapshot(cfg: DictConfig, run_dir: Path) -> None:
    """``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml``, as Hydra writes them, once the run
    owns its directory (Hydra's own copy is off: it would be written before any check)."""
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
        return
    hydra_cfg = HydraConfig.get()
    folder = run_dir / ".hydra"
    texts = (OmegaConf.to_yaml(cfg), OmegaConf.to_yaml({"hydra": hydra_cfg}), OmegaConf.to_yaml(list(hydra_cfg.overrides.task)))
    for name, text in zip(SNAPSHOT_FILES, texts):
        write_text(folder / name, text)


def run_app(
    cfg: DictConfig, schema: type[T], task: Callable[[T, Path], Result], result_type: type[Result] = StageMetrics
) -> Result | None:
    """Run ``task(typed_cfg, run_dir)`` with the project's error and status conventions; a failure
    is recorded in ``run_dir/metrics.json`` as a ``result_type``."""
    run_dirs: list[Path] = []  # the run directory, once this process owns it: failures are recorded there

    def body() -> Result:
        run_dir = prepare_run_dir(cfg.get("run_dir") or hydra_run_dir() or "outputs/run")
        if not is_main_process():  # DDP: rank 0 owns the directory
            return task(to_typed(cfg, schema), run_dir)
        with RunLock(run_dir):
            try:
                typed = to_typed(cfg, schema)
            except ConfigError:
                if not holds_work(run_dir):  # a fresh directory records the bad config and its failure
                    run_dirs.append(run_dir)
                    write_config_snapshot(cfg, run_dir)
                raise
            check_same_work(run_dir, to_plain(typed), to_plain(schema()), getattr(schema, "SETTINGS_ALLOWED", SETTINGS_ALLOWED))
            remove_stale_temps(run_dir)
            run_dirs.append(run_dir)
            previous = recorded_snapshot(run_dir) if holds_work(run_dir) else None
            write_config_snapshot(cfg, run_dir)
            try:
                return task(typed, run_dir)
            except (RunRefused, CheckpointError, ScalesError):
                if previous is not None:  # refused by a check inside the task: the run on disk keeps its record
                    for path, data in previous.items():
                        write_bytes(path, data)
                raise

    return run_guarded(body, lambda: run_dirs[0] if run_dirs else None, result_type)


def run_step(cfg: DictConfig, schema: type[T], check: Callable[[T], None], step: Callable[[T], R]) -> R | Result | None:
    """A step on a finished run (export, prune, QAT): ``step(typed_cfg)`` once ``check`` passed, with
    ``run_guarded``'s conventions. The step writes into the run it is given (no run directory of its own);
    the entry module imports the step's code inside ``step``, so a bad setting is refused before torch loads."""

    def body() -> R:
        typed = to_typed(cfg, schema)
        check(typed)
        return step(typed)

    return run_guarded(body)


def run_guarded(
    body: Callable[[], R], run_dir: Callable[[], Path | None] = lambda: None, result_type: type[Result] = StageMetrics
) -> R | Result | None:
    """The command-line conventions of every app: a project error is one clear line and exit code 1
    (in a multirun, a failed job's result); Ctrl-C or a stop signal exits 130; a bug keeps its
    traceback. The failure is recorded in ``run_dir()/metrics.json`` when there is one."""

    def record(status: Status, message: str) -> None:
        folder = run_dir()
        if folder is not None and folder.is_dir():
            try:
                record_failure(folder / "metrics.json", result_type, status, message)
            except (OSError, RepOptError) as exc:  # e.g. the disk is still full: the message is printed anyway
                log.warning("could not record the failure in %s: %s", folder / "metrics.json", exc)

    try:
        return body()
    except KeyboardInterrupt:
        record(Status.INTERRUPTED, "interrupted by the user")
        log.error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except RepOptError as exc:
        if isinstance(exc, Interrupted):
            log.warning(str(exc))
            # the sweep records it and exits 130 once every job has stopped; but a job SLURM is requeueing
            # leaves no result, so that its launcher (submitit) waits for the job's next run
            if is_multirun() and not being_requeued():
                return result_type(status=Status.INTERRUPTED, error=str(exc))
            sys.exit(EXIT_INTERRUPTED)
        if not isinstance(exc, RunRefused):  # a refused run changes nothing on disk
            record(status_of(exc), str(exc))
        report_error(str(exc), f"{type(exc).__name__}: {exc}")
        if is_multirun():
            return result_type(status=status_of(exc), error=str(exc))
        sys.exit(EXIT_FAILED)
    except Exception as exc:  # a bug: keep the traceback, record the failure
        record(Status.FAILED, f"{type(exc).__name__}: {exc}")
        if is_multirun():
            log.error("job failed:\n%s", traceback.format_exc())
            return result_type(status=Status.FAILED, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        torch = sys.modules.get("torch")  # this module must not load torch: the config is checked before it loads
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
