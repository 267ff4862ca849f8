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
import random
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .config import to_typed
from .errors import ConfigError, Interrupted, RepOptError, status_of
from .io import read_json, write_json

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _record_failure(run_dir: Path | None, status: str, message: str) -> None:
    if run_dir is None or not run_dir.is_dir():
        return
    metrics_path = run_dir / "metrics.json"
    previous = read_json(metrics_path) or {}
    if previous.get("status") in ("completed", "diverged", "interrupted"):
        return  # the trainer already wrote the precise status, or an earlier run's result stands
    write_json(metrics_path, {**previous, "status": status, "error": message})


def run_app(cfg: DictConfig, schema: type[T], task: Callable[[T, Path], dict]) -> dict | None:
    """Run ``task(typed_cfg, run_dir)`` with the project's error and status conventions."""
    run_dirs: list[Path] = []  # the run directory, once it exists: failures are recorded there

    def body() -> dict:
        run_dirs.append(prepare_run_dir(cfg.get("run_dir") or hydra_run_dir() or "outputs/run"))
        return task(to_typed(cfg, schema), run_dirs[0])

    return run_guarded(body, lambda: run_dirs[0] if run_dirs else None)


def run_guarded(body: Callable[[], dict], run_dir: Callable[[], Path | None] = lambda: None) -> dict | None:
    """The command-line conventions of every app: a project error is one clear line and exit code 1
    (in a multirun, a failed job's result); Ctrl-C or a stop signal exits 130; a bug keeps its
    traceback. The failure is recorded in ``run_dir()/metrics.json`` when there is one."""
    try:
        return body()
    except KeyboardInterrupt:
        _record_failure(run_dir(), "interrupted", "interrupted by the user")
        log.error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except RepOptError as exc:
        if isinstance(exc, Interrupted):
            log.warning(str(exc))
            sys.exit(EXIT_INTERRUPTED)
        _record_failure(run_dir(), status_of(exc), str(exc))
        log.error("%s: %s", type(exc).__name__, exc)
        print(f"error: {exc}", file=sys.stderr)
        if is_multirun():
            return {"status": "failed", "error": str(exc)}
        sys.exit(EXIT_FAILED)
    except Exception as exc:  # a bug: keep the traceback, record the failure
        _record_failure(run_dir(), "failed", f"{type(exc).__name__}: {exc}")
        if is_multirun():
            log.error("job failed:\n%s", traceback.format_exc())
            return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        raise
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
