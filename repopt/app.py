"""What every Hydra app of the project does around its training function.

* turns Hydra's config into the typed schema (unknown keys / wrong types fail before any work);
* finds the run directory (Hydra's output dir, or ``run_dir=``) and checks it is writable;
* maps outcomes to ``metrics.json`` statuses and exit codes: ``completed``; ``diverged`` and
  ``interrupted`` (written by the trainer); ``failed`` for bad input or a crash. A bad-input error
  prints one clear line, not a traceback. In a multirun sweep a failed job is recorded and the
  sweep goes on; a single run exits non-zero.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .config import to_typed
from .errors import ConfigError, Interrupted, RepOptError
from .results import Result, StageMetrics, Status, record_failure, status_of

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


def prepare_run_dir(path: str | Path) -> Path:
    """Create the run directory and prove it is writable before any training starts."""
    run_dir = Path(path).expanduser().resolve()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):  # unique: DDP ranks probe at once
            pass
    except OSError as exc:
        raise ConfigError(f"run directory {run_dir} is not writable ({exc.strerror}); choose another with run_dir=... or hydra.run.dir=...") from None
    return run_dir


def run_app(cfg: DictConfig, schema: type[T], task: Callable[[T, Path], Result],
            result_type: type[Result] = StageMetrics) -> Result | None:
    """Run ``task(typed_cfg, run_dir)`` with the project's error and status conventions; a failure
    is recorded in ``run_dir/metrics.json`` as a ``result_type``."""
    run_dirs: list[Path] = []  # the run directory, once it exists: failures are recorded there

    def body() -> Result:
        run_dirs.append(prepare_run_dir(cfg.get("run_dir") or hydra_run_dir() or "outputs/run"))
        return task(to_typed(cfg, schema), run_dirs[0])

    return run_guarded(body, lambda: run_dirs[0] if run_dirs else None, result_type)


def run_guarded(body: Callable[[], R], run_dir: Callable[[], Path | None] = lambda: None,
                result_type: type[Result] = StageMetrics) -> R | Result | None:
    """The command-line conventions of every app: a project error is one clear line and exit code 1
    (in a multirun, a failed job's result); Ctrl-C or a stop signal exits 130; a bug keeps its
    traceback. The failure is recorded in ``run_dir()/metrics.json`` when there is one."""

    def record(status: Status, message: str) -> None:
        folder = run_dir()
        if folder is not None and folder.is_dir():
            record_failure(folder / "metrics.json", result_type, status, message)

    try:
        return body()
    except KeyboardInterrupt:
        record(Status.INTERRUPTED, "interrupted by the user")
        log.error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except RepOptError as exc:
        if isinstance(exc, Interrupted):
            log.warning(str(exc))
            sys.exit(EXIT_INTERRUPTED)
        record(status_of(exc), str(exc))
        log.error("%s: %s", type(exc).__name__, exc)
        print(f"error: {exc}", file=sys.stderr)
        if is_multirun():
            return result_type(status=Status.FAILED, error=str(exc))
        sys.exit(EXIT_FAILED)
    except Exception as exc:  # a bug: keep the traceback, record the failure
        record(Status.FAILED, f"{type(exc).__name__}: {exc}")
        if is_multirun():
            log.error("job failed:\n%s", traceback.format_exc())
            return result_type(status=Status.FAILED, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
