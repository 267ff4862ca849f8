"""The end of a multirun (``repopt/sweep.py``): the summary line and exit code of a sweep with failed,
interrupted or only good jobs, and SIGTERM to a sweep's launching process (the basic launcher, and the
joblib launcher whose loky workers must stop with it). ``docs/reliability.md`` summarizes what the
process tests show.

The process tests run real ``python -m hypersearch -m`` sweeps of the tiny model on synthetic data.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from repopt.engine import load_checkpoint
from repopt.io import write_json
from repopt.sweep import JobOutcome, SweepGuard, is_loky_worker_cmdline, loky_workers, read_outcomes, summarize
from tests.helpers.runs import SIGNAL_RUN, SIGNAL_STEPS, TINY, _env, read_json, wait_until


@contextlib.contextmanager
def _process(command: list[str], log_path: Path):
    """A child process with its output in ``log_path``; it and its children are killed on the way out if still running."""
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(command, cwd=log_path.parent, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                for pid in _children(proc.pid):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                proc.kill()
                proc.wait()


def _children(parent: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    pids.append(int(entry))
    return pids


def _gone(pid: int) -> bool:
    """The process has ended (a zombie waiting for a reaper that never comes counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _sweep(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "hypersearch", "-m", *overrides]


# ------------------------------------------------------------------ the summary, without processes


def test_summary_line_and_exit_code_of_each_outcome():
    ok = JobOutcome("0", "completed")
    line, code = summarize([JobOutcome("1", "completed"), ok])
    assert (line, code) == ("sweep: 2 jobs completed", 0)
    assert summarize([ok, JobOutcome("1", "pruned")]) == ("sweep: 2 jobs ended (1 completed, 1 pruned)", 0)
    line, code = summarize(
        [JobOutcome("10", "failed", "boom\ntraceback ..."), ok, JobOutcome("2", "diverged", "non-finite loss")]
    )
    assert code == 1
    assert line == "sweep: 2 of 3 jobs failed (job 2: diverged: non-finite loss; job 10: failed: boom)"
    line, code = summarize([ok, JobOutcome("1", "interrupted", "stopped by SIGTERM")])
    assert (line, code) == ("sweep: 1 of 2 jobs was interrupted (job 1: interrupted: stopped by SIGTERM)", 130)
    line, code = summarize([JobOutcome("0", "failed", "x"), JobOutcome("1", "interrupted", "y")])
    assert code == 130 and "2 of 2 jobs failed or were interrupted" in line


def test_a_job_without_an_outcome_counts_as_failed(tmp_path):
    """A record still ``running`` (the job's process died) and a job directory of this sweep without a
    record are failed jobs; a job directory older than the sweep (a reused sweep directory) is not counted."""
    sweep = tmp_path / "sweep"
    for job in ("0", "1", "2", "old"):
        (sweep / job).mkdir(parents=True)
    long_ago = time.time() - 3600
    os.utime(sweep / "old", (long_ago, long_ago))
    write_json(sweep / ".jobs" / "0.json", {"job": 0, "status": "completed", "error": None, "output_dir": str(sweep / "0")})
    write_json(sweep / ".jobs" / "1.json", {"job": 1, "status": "running", "error": None, "output_dir": str(sweep / "1")})
    line, code = summarize(read_outcomes(sweep, since=time.time() - 60))
    assert code == 1, line
    assert line.startswith("sweep: 2 of 3 jobs failed (job 1: failed: no result recorded (the job started")
    assert line.endswith("; job 2: failed: no result recorded)")


def test_loky_workers_are_told_from_loky_resource_trackers():
    py = sys.executable
    assert is_loky_worker_cmdline(
        [py, "-m", "joblib.externals.loky.backend.popen_loky_posix", "--process-name", "LokyProcess-1", "--pipe", "14", ""]
    )
    assert is_loky_worker_cmdline([py, "-B", "-m", "loky.backend.popen_loky_posix", "--pipe", "3", ""])
    tracker = "from joblib.externals.loky.backend.resource_tracker import main; main(3, False)"
    assert not is_loky_worker_cmdline([py, "-B", "-c", tracker, ""])
    assert not is_loky_worker_cmdline([py, "-B", "-c", "from multiprocessing.resource_tracker import main;main(11)", ""])
    assert not is_loky_worker_cmdline([py, "-m", "hypersearch", "-m", "seed=0,1", ""])
    assert loky_workers() == []  # this process started none


def test_guard_installs_and_restores_its_handlers_and_travels_without_them(tmp_path):
    """``on_multirun_start`` installs SIGTERM/SIGINT handlers; what a launcher pickles for a job's process
    is the sweep's identity only; ``on_multirun_end`` puts the previous handlers back (an empty sweep: exit 0)."""
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}, "hydra_logging": None, "verbose": False}})
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    guard = SweepGuard()
    guard.on_multirun_start(config)
    try:
        assert all(signal.getsignal(sig) == guard._on_signal for sig in before)
        copy = pickle.loads(pickle.dumps(guard))
        assert copy.sweep_dir == str(tmp_path / "sweep") and copy.parent_pid == os.getpid() and copy._previous == {}
    finally:
        guard.on_multirun_end(config)
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ------------------------------------------------------------------ real sweeps


@pytest.mark.parametrize("lrs, code", [("1e30,0.05", 1), ("0.05,0.1", 0)], ids=["one-job-diverges", "all-good"])
def test_sweep_exit_code_and_summary(tmp_path, lrs, code):
    """``python -m hypersearch -m optim.lr=1e30,0.05``: job 0 diverges at its first step, job 1 completes;
    the sweep ends with ``sweep: 1 of 2 jobs failed (job 0: ...)`` on stderr and exit code 1. With two
    good learning rates: ``sweep: 2 jobs completed`` and exit code 0."""
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        _sweep(*TINY, "epochs=1", "sched.warmup_epochs=0", f"optim.lr={lrs}", f"hydra.sweep.dir={sweep}"),
        check=False,
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == code, output
    assert read_json(sweep / "1" / "metrics.json")["status"] == "completed"
    if code:
        assert read_json(sweep / "0" / "metrics.json")["status"] == "diverged"
        assert re.search(
            r"^sweep: 1 of 2 jobs failed \(job 0: (diverged|failed): non-finite loss at step 1", done.stderr, re.M
        ), output
        assert "job 1" not in done.stderr.split("sweep: ", 1)[1]
    else:
        assert "sweep: 2 jobs completed" in done.stderr.splitlines(), output


def test_sigterm_stops_a_basic_launcher_sweep_with_130(tmp_path):
    """SIGTERM while job 0 of 2 trains (basic launcher: the jobs run one after the other in the launching
    process): job 0 stops after its current step with ``interrupted``; job 1, started after the stop,
    stops at its first step, also ``interrupted`` with its ``last.pt``; the sweep exits 130 with its summary."""
    sweep = tmp_path / "sweep"
    with _process(_sweep(*SIGNAL_RUN, "epochs=20", "seed=0,1", f"hydra.sweep.dir={sweep}"), tmp_path / "sweep.out") as proc:
        assert wait_until(lambda: (sweep / "0" / "last.pt").exists() or proc.poll() is not None, timeout=240)
        assert proc.poll() is None, (tmp_path / "sweep.out").read_text()
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=240)
    output = (tmp_path / "sweep.out").read_text()
    assert returncode == 130, output
    assert "sweep: 2 of 2 jobs were interrupted (job 0: interrupted: stopped " in output  # by SIGTERM / at the end of epoch n
    assert "job 1: interrupted: stopped by SIGTERM at epoch 1, step 1;" in output
    for job in ("0", "1"):
        assert read_json(sweep / job / "metrics.json")["status"] == "interrupted", (job, output)
    run = load_checkpoint(sweep / "1" / "last.pt")["run"]
    assert (run["epoch"], run["step_in_epoch"], run["global_step"]) == (0, 1, 1)


@pytest.mark.slow
def test_sigterm_to_a_joblib_sweep_stops_its_workers_then_resume_completes(tmp_path):
    """``hydra/launcher=joblib hydra.launcher.n_jobs=2``, two jobs of 20 short epochs: SIGTERM to the
    launching process once both jobs have written their first ``last.pt``. It tells the two loky workers;
    each job finishes its step, writes ``last.pt`` and ``interrupted`` and returns; the launching process
    exits 130 with the summary, and no process of the sweep is left afterwards. The same sweep with
    ``resume=true`` (same ``hydra.sweep.dir``) then completes both jobs and exits 0."""
    sweep = tmp_path / "sweep"
    command = _sweep(
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SIGNAL_RUN, "epochs=20", "seed=0,1", f"hydra.sweep.dir={sweep}"
    )
    with _process(command, tmp_path / "sweep.out") as proc:
        both = lambda: all((sweep / j / "last.pt").exists() for j in ("0", "1"))  # noqa: E731
        assert wait_until(lambda: both() or proc.poll() is not None, timeout=300)
        assert proc.poll() is None, (tmp_path / "sweep.out").read_text()
        workers, processes = loky_workers(proc.pid), _children(proc.pid)
        assert len(workers) == 2, processes
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=240)
    output = (tmp_path / "sweep.out").read_text()
    assert returncode == 130, output
    assert "received SIGTERM: stopping the sweep" in output and "(2 worker processes told)" in output
    assert "sweep: 2 of 2 jobs were interrupted" in output
    steps = []
    for job in ("0", "1"):
        metrics = read_json(sweep / job / "metrics.json")
        assert metrics["status"] == "interrupted", (job, output)
        assert "received SIGTERM" in (sweep / job / "app.log").read_text()
        run = load_checkpoint(sweep / job / "last.pt")["run"]
        assert 1 <= run["epoch"] < 20 and run["global_step"] == metrics["steps"]
        steps.append(run["global_step"])
    assert wait_until(lambda: all(_gone(pid) for pid in processes), timeout=10), [p for p in processes if not _gone(p)]

    resumed = subprocess.run(
        command + ["resume=true"], check=False, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "sweep: 2 jobs completed" in resumed.stderr.splitlines()
    for job, stopped_at in zip(("0", "1"), steps):
        metrics = read_json(sweep / job / "metrics.json")
        assert metrics["status"] == "completed" and metrics["epochs"] == 20 and metrics["steps"] == 20 * SIGNAL_STEPS
        assert f"step {stopped_at % SIGNAL_STEPS}" in (sweep / job / "app.log").read_text()  # "resumed from ..."
