"""The end of a Hydra multirun: one summary line and an exit code, and a clean stop on SIGTERM/SIGINT.

``SweepGuard`` is a Hydra callback, registered in the root configs (``conf/hypersearch.yaml``,
``conf/target_train.yaml``, ``conf/search_and_train.yaml``) as ``hydra.callbacks.sweep_guard``. It does
nothing in a single run (``hydra.mode=RUN``: the app's own exit code stands).

Records. Each job writes ``<sweep dir>/.jobs/<job num>.json`` (atomically) from the process that runs
it (a loky worker under ``hydra/launcher=joblib``, the job process under submitit, the launching
process under the basic launcher): ``running`` when it starts, then its outcome when it ends: the
``status`` of the result the app returned (``completed``, ``diverged``, ``interrupted``, ``failed``,
``pruned``) and its ``error``; ``failed`` with the exception's text when the task raised. A new
sweep in the same directory (a ``resume=true`` rerun) clears the earlier records first.

Summary and exit code. Once the launcher has returned, the launching process reads the records and
prints one line on stderr (once: logging writes it only to a log file Hydra's logging has, if any),
``sweep: 1 of 2 jobs failed (job 0: diverged: non-finite loss ...)`` or ``sweep: 2 jobs completed``.
A job that started but never recorded an outcome (its process was killed), and a job directory of
this sweep without any record, count as ``failed`` ("no result recorded"). The process then exits
with 130 when any job was interrupted, 1 when any other job did not complete (``pruned`` counts as
done), and 0 otherwise.

How the exit code gets out: ``Hydra.multirun`` (``hydra/_internal/hydra.py``) calls
``callbacks.on_multirun_end`` as its last statement before ``return``; ``Callbacks._notify``
(``hydra/_internal/callbacks.py``) turns a callback's ``Exception`` into a warning, and
``run_and_report`` (``hydra/_internal/utils.py``) catches ``Exception`` only, so the ``SystemExit``
raised here passes both, runs ``_run_hydra``'s ``finally`` (``GlobalHydra.instance().clear()``, the
only thing left to do) and leaves the ``@hydra.main`` function as the process's exit code (an
in-process caller sees ``SystemExit``). ``on_multirun_end`` runs the callbacks in reverse order, so
``sweep_guard`` is the first entry of ``hydra.callbacks``: a callback listed after it ends the
sweep before it.

Stopping. ``on_multirun_start`` installs SIGTERM and SIGINT handlers in the launching process. The
first signal writes ``.jobs/STOP`` and sends SIGTERM to the loky worker processes of the sweep
(children of this process started as ``...loky.backend.popen_loky_posix``, not loky's resource
tracker, and only those that have registered a job, i.e. have the handler below); each job finishes
its current step, writes ``last.pt``, records ``interrupted`` and returns, and the launching process
waits for the launcher to return as usual, then exits 130. SIGTERM is what is forwarded for either
signal: a Ctrl-C in a terminal has already sent SIGINT to the workers (one process group), and a
second SIGINT would make the trainer abort without its step-boundary checkpoint. A job started after
the stop, or one that was not training when the signal came (setting up, exporting, between the two
stages of a pipeline job), stops at its first training step: every job registers a trainer callback
that asks the trainer to stop once its process got a stop signal or ``.jobs/STOP`` exists (looked for
at most once a second, so launchers with a shared file system, submitit's too, stop the same way).
A loky worker keeps a handler for SIGTERM/SIGINT from its first job on (loky ends its workers with
SIGKILL), so a signal that reaches it between jobs is a stop, not its death (which would break the
whole sweep). A second signal to the launching process ends the sweep at once: the workers are
killed (each keeps the ``last.pt`` it wrote before) and the previous handler runs (SIGINT:
KeyboardInterrupt; SIGTERM: the default, exit 143). ``on_multirun_end`` puts the previous handlers
back once it has written the summary. Under the basic launcher the job runs in the launching process
and the trainer's own handler takes the signal; an interrupted job there stops the rest of the sweep
the same way.

Not covered: when the launcher raises instead of returning (the basic sweeper re-raises the
exception of a job whose task raised, which the apps never do as they return a failed result; joblib
raises ``TerminatedWorkerError`` when a worker is killed from outside, e.g. by the OOM killer),
``on_multirun_end`` is not called: Hydra prints the error and exits 1, and the records stay in
``.jobs/``. SIGKILL to the launching process cannot be caught: its loky workers go on (they do not
watch their parent).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.utils import JobReturn, JobStatus, configure_log
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .app import log_to_files
from .engine.callbacks import Callback as TrainerCallback
from .engine.callbacks import active
from .io import read_json, write_json
from .rundir import SHARED_SEARCHES

log = logging.getLogger(__name__)

RECORDS = ".jobs"  # <sweep dir>/.jobs/<job num>.json
STOP_MARKER = "STOP"  # <sweep dir>/.jobs/STOP: the sweep was asked to stop
EXIT_FAILED, EXIT_INTERRUPTED = 1, 130
DONE = ("completed", "pruned")  # a job that ended with one of these did its work
NO_RESULT = "no result recorded"
MARKER_CHECK_SECONDS = 1.0
LOKY_WORKER_MODULE = "loky.backend.popen_loky_posix"  # joblib.externals.loky.backend.popen_loky_posix, or loky's own

# This process's stop request, for the sweep it belongs to (a loky worker outlives one sweep).
_stop = {"sweep": None, "signal": None}
_job_scope: Optional[contextlib.ExitStack] = None  # the trainer callback of the job running in this process
_worker_handlers_installed = False


@dataclass
class JobOutcome:
    """One job of a sweep, as the summary reports it."""

    job: str
    status: str
    error: Optional[str] = None
    output_dir: Optional[str] = None


# ------------------------------------------------------------------ the summary


def _first_line(text: Optional[str], limit: int = 300) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _job_key(job: str):
    return (0, int(job), "") if str(job).isdigit() else (1, 0, str(job))


def summarize(outcomes: list[JobOutcome]) -> tuple[str, int]:
    """The summary line of a sweep and its exit code (0, 1 or 130)."""
    outcomes = sorted(outcomes, key=lambda o: _job_key(o.job))
    n = len(outcomes)
    jobs = "job" if n == 1 else "jobs"
    bad = [o for o in outcomes if o.status not in DONE]
    if not bad:
        pruned = sum(o.status == "pruned" for o in outcomes)
        if not pruned:
            return f"sweep: {n} {jobs} completed", 0
        return f"sweep: {n} {jobs} ended ({n - pruned} completed, {pruned} pruned)", 0
    interrupted = any(o.status == "interrupted" for o in bad)
    failed = any(o.status != "interrupted" for o in bad)
    verb = "failed or were interrupted" if interrupted and failed else ("were interrupted" if interrupted else "failed")
    if len(bad) == 1 and verb == "were interrupted":
        verb = "was interrupted"
    details = "; ".join(
        f"job {o.job}: {o.status}: {_first_line(o.error)}" if _first_line(o.error) else f"job {o.job}: {o.status}" for o in bad
    )
    return f"sweep: {len(bad)} of {n} {jobs} {verb} ({details})", EXIT_INTERRUPTED if interrupted else EXIT_FAILED


def read_outcomes(sweep_dir: str | Path, since: Optional[float] = None) -> list[JobOutcome]:
    """The jobs of the sweep in ``sweep_dir``: its records, a record still ``running`` as failed, and
    each job directory without a record (changed since ``since``, the sweep's start) as failed."""
    sweep_dir = Path(sweep_dir)
    outcomes, recorded_dirs = [], set()
    folder = sweep_dir / RECORDS
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data = read_json(path)
        if not isinstance(data, dict):
            outcomes.append(JobOutcome(path.stem, "failed", f"{NO_RESULT} (unreadable {path.name})"))
            continue
        status, error = str(data.get("status") or "failed"), data.get("error")
        if status == "running":
            status, error = "failed", f"{NO_RESULT} (the job started but its process ended without an outcome)"
        outcomes.append(JobOutcome(str(data.get("job", path.stem)), status, error, data.get("output_dir")))
        if data.get("output_dir"):
            recorded_dirs.add(os.path.normpath(str(data["output_dir"])))
    if since is not None and sweep_dir.is_dir():
        for child in sweep_dir.iterdir():
            if child.name.startswith(".") or child.name == SHARED_SEARCHES or not child.is_dir():
                continue
            here = os.path.normpath(str(child.absolute()))
            if any(d == here or d.startswith(here + os.sep) for d in recorded_dirs):  # hydra.sweep.subdir may nest
                continue
            try:
                changed = child.stat().st_mtime >= since - 1.0  # file systems with a coarse clock
            except OSError:
                continue
            if changed:
                outcomes.append(JobOutcome(child.name, "failed", NO_RESULT, str(child)))
    return outcomes


# ------------------------------------------------------------------ processes


def _parent_of(pid: str) -> Optional[int]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def is_loky_worker_cmdline(args: list[str]) -> bool:
    """Whether a command line (``/proc/<pid>/cmdline`` split at NULs) is a loky worker (not its resource tracker)."""
    return any(a.endswith(LOKY_WORKER_MODULE) and args[i - 1] == "-m" for i, a in enumerate(args) if i > 0)


def loky_workers(parent: Optional[int] = None) -> list[int]:
    """The pids of the loky worker processes whose parent is ``parent`` (this process), from /proc
    (empty where there is no /proc)."""
    parent = os.getpid() if parent is None else parent
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for entry in entries:
        if not entry.isdigit() or _parent_of(entry) != parent:
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if is_loky_worker_cmdline(args):
            pids.append(int(entry))
    return sorted(pids)


def _in_loky_worker() -> bool:
    import multiprocessing

    return multiprocessing.current_process().name.startswith("LokyProcess")


def _set_stop(sweep_id: Optional[str], signum: int) -> None:
    _stop["sweep"], _stop["signal"] = sweep_id, signum


def _stop_requested(sweep_id: Optional[str]) -> Optional[int]:
    return _stop["signal"] if _stop["sweep"] == sweep_id else None


def _worker_signal(signum, frame) -> None:
    """A loky worker's handler outside training: remember the stop for the job's trainer callback."""
    if _stop["signal"] is None:
        log.warning("received %s: this job stops at its next training step", signal.Signals(signum).name)
    _stop["signal"] = signum


def _install_worker_handlers() -> None:
    global _worker_handlers_installed
    if _worker_handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _worker_signal)
    _worker_handlers_installed = True


class _StopWatch(TrainerCallback):
    """Ends the job's training at a step boundary once the sweep was asked to stop."""

    def __init__(self, sweep_id: Optional[str], marker: Path):
        self.sweep_id, self.marker = sweep_id, marker
        self._next_check = 0.0

    def on_step_end(self, trainer) -> None:
        signum = _stop_requested(self.sweep_id)
        if signum is None and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + MARKER_CHECK_SECONDS
            if self.marker.exists():
                signum = signal.SIGTERM
                _set_stop(self.sweep_id, signum)
        if signum is not None:
            trainer.request_stop(signum)


def _close_job_scope() -> None:
    global _job_scope
    if _job_scope is not None:
        scope, _job_scope = _job_scope, None
        scope.close()


# ------------------------------------------------------------------ the callback


def _is_multirun(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def _sweep_dir(config: DictConfig) -> Path:
    return Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).absolute()


def _job_outcome(job_return: JobReturn) -> tuple[str, Optional[str]]:
    """(status, error) of a finished job."""
    if job_return.status == JobStatus.FAILED:
        exc = job_return._return_value  # the property re-raises it
        return "failed", f"{type(exc).__name__}: {exc}"
    value = job_return._return_value
    status = getattr(value, "status", None)
    if status is None:  # the task returned nothing to judge: it did not fail
        return "completed", None
    return str(getattr(status, "value", status)), getattr(value, "error", None)


class SweepGuard(Callback):
    """Records each job's outcome, ends a multirun with a summary and an exit code, and stops a sweep
    cleanly on SIGTERM/SIGINT (see the module docstring)."""

    _PICKLED = ("sweep_dir", "start", "parent_pid", "sweep_id")

    def __init__(self) -> None:
        self.sweep_dir: Optional[str] = None
        self.start: Optional[float] = None
        self.parent_pid: Optional[int] = None
        self.sweep_id: Optional[str] = None
        self._previous: dict[int, Any] = {}
        self._stopping: Optional[int] = None

    # the launcher sends the callback to each job's process: only the sweep's identity travels
    def __getstate__(self) -> dict:
        return {k: getattr(self, k) for k in self._PICKLED}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.__dict__.update(state)

    # ---------------------------------------------------------------- launching process

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = _sweep_dir(config)
        self.sweep_dir, self.start, self.parent_pid = str(sweep), time.time(), os.getpid()
        self.sweep_id = f"{sweep}@{self.start}"
        self._stopping = None
        _set_stop(self.sweep_id, None)
        records = sweep / RECORDS
        if records.is_dir():  # a reused sweep directory: the earlier sweep's records are not this one's
            for path in records.iterdir():
                if path.is_file():
                    path.unlink(missing_ok=True)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _marker(self) -> Path:
        return Path(self.sweep_dir) / RECORDS / STOP_MARKER

    def _request_stop(self, signum: int) -> None:
        """The sweep stops: for the jobs of this process and, through the marker, every other's."""
        _set_stop(self.sweep_id, signum)
        try:
            write_json(self._marker(), {"signal": signal.Signals(signum).name, "time": time.time()})
        except OSError as exc:
            log.warning("could not write %s: %s", self._marker(), exc)

    def _registered_workers(self) -> list[int]:
        """The sweep's loky workers that have started a job (and so handle SIGTERM as a stop)."""
        recorded = set()
        for path in (Path(self.sweep_dir) / RECORDS).glob("*.json"):
            data = read_json(path)
            if isinstance(data, dict) and isinstance(data.get("pid"), int):
                recorded.add(data["pid"])
        return [pid for pid in loky_workers() if pid in recorded]

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._stopping is not None:  # a second signal: end it now
            workers = loky_workers()
            log.warning("received %s again: killing the sweep's %d worker processes", name, len(workers))
            for pid in workers:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            previous = self._previous.get(signum, signal.SIG_DFL)
            self._restore_handlers()
            if callable(previous):
                previous(signum, frame)
            elif previous in (signal.SIG_DFL, None):
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self._stopping = signum
        self._request_stop(signum)
        workers = self._registered_workers()
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        told = f"{len(workers)} worker processes told" if workers else f"jobs elsewhere see {self._marker()}"
        log.warning(
            "received %s: stopping the sweep; each job stops after its current step and writes last.pt "
            "(%s); a second signal ends it at once",
            name,
            told,
        )

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._end(config)
        finally:
            self._restore_handlers()  # last: a signal while the summary is written still stops the workers

    def _end(self, config: DictConfig) -> None:
        if self.sweep_dir is None:
            return
        line, code = summarize(read_outcomes(self.sweep_dir, since=self.start))
        self._marker().unlink(missing_ok=True)
        log_config = OmegaConf.select(config, "hydra.hydra_logging")
        if log_config is not None:  # log as Hydra's launcher does, not into the last job's log file (basic launcher)
            with contextlib.suppress(Exception):  # otherwise keep the logging there is
                configure_log(log_config, OmegaConf.select(config, "hydra.verbose", default=False))
        lines = [line]
        if code == EXIT_INTERRUPTED:
            lines.append(f"sweep: continue with the same command and resume=true hydra.sweep.dir={self.sweep_dir}")
        for text in lines:  # printed once; logged only to a log file Hydra's logging has (its console has the print)
            log_to_files(log, logging.INFO if code == 0 else logging.ERROR, "%s", text)
            print(text, file=sys.stderr, flush=True)
        if code:
            raise SystemExit(code)

    # ---------------------------------------------------------------- the job's process

    def _job_sweep_dir(self, config: DictConfig) -> Path:
        """The launching process's sweep directory (absolute before any ``hydra.job.chdir``)."""
        return Path(self.sweep_dir) if self.sweep_dir else _sweep_dir(config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _job_scope
        if not _is_multirun(config):
            return
        sweep = self._job_sweep_dir(config)
        sweep_id = self.sweep_id or str(sweep)
        if os.getpid() != self.parent_pid:
            if _in_loky_worker():
                _install_worker_handlers()  # before the record: the parent signals only registered workers
            if _stop["sweep"] != sweep_id:  # a worker reused from an earlier sweep
                _set_stop(sweep_id, None)
        _close_job_scope()
        _job_scope = contextlib.ExitStack()
        _job_scope.enter_context(active(_StopWatch(sweep_id, sweep / RECORDS / STOP_MARKER)))
        self._write_record(config, "running", None)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        _close_job_scope()
        status, error = _job_outcome(job_return)
        self._write_record(config, status, error)
        if status == "interrupted" and os.getpid() == self.parent_pid and self.sweep_dir is not None:
            self._request_stop(_stop_requested(self.sweep_id) or signal.SIGTERM)  # basic launcher: stop the jobs after it

    def _write_record(self, config: DictConfig, status: str, error: Optional[str]) -> None:
        num = OmegaConf.select(config, "hydra.job.num")
        write_json(
            self._job_sweep_dir(config) / RECORDS / f"{num}.json",
            {
                "job": num,
                "status": status,
                "error": error,
                "output_dir": OmegaConf.select(config, "hydra.runtime.output_dir"),
                "overrides": list(OmegaConf.select(config, "hydra.overrides.task") or []),
                "pid": os.getpid(),
            },
        )
