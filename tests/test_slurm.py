"""On a real SLURM cluster: a pipeline sweep through ``hydra/launcher=slurm_cpu`` that
``pipelines.compare`` reads; an ``sbatch`` job requeued mid-run (``scontrol requeue``) that continues by
itself and ends with the numbers of an uninterrupted run; a sweep job requeued mid-run that its
launcher waits for. These are marked ``slurm`` and need a cluster that
answers (``bash scripts/slurm_cluster.sh up`` starts one on this machine; ``.ci/run`` does); without
one they skip, saying why.

How a restarted job is recognised (repopt/scheduler.py) and that a plain re-run is still refused are
tested without a cluster: those run everywhere.
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from hypersearch.app import main as hs_main
from pipelines.compare import compare
from repopt.engine import load_checkpoint
from repopt.engine.callbacks import active
from repopt.scheduler import being_requeued, restarted_by_scheduler
from tests.helpers.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.helpers.runs import (
    SIGNAL_RUN,
    SIGNAL_STEPS,
    TINY,
    TINY_STEPS,
    StopAt,
    _env,
    _sha256,
    pipeline_overrides,
    read_json,
    run_hydra,
    wait_until,
)

TIMING_COLUMNS = ["epoch_seconds", "images_per_sec"]
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


# ------------------------------------------------------------------ without a cluster


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),  # not a SLURM job
        ({"SLURM_JOB_ID": "17"}, False),  # a job's first run: no count
        ({"SLURM_JOB_ID": "17", "SLURM_RESTART_COUNT": "0"}, False),
        ({"SLURM_JOB_ID": "17", "SLURM_RESTART_COUNT": "1"}, True),  # requeued once
        ({"SLURM_JOB_ID": "18", "SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "4"}, True),  # an array task, again
        ({"SLURM_RESTART_COUNT": "1"}, False),  # a stray count outside a job
        ({"SLURM_JOB_ID": "17", "SLURM_RESTART_COUNT": "one"}, False),
    ],
)
def test_restarted_by_scheduler_reads_slurms_restart_count(monkeypatch, env, expected):
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert restarted_by_scheduler() is expected
    assert restarted_by_scheduler(env) is expected  # an explicit mapping reads the same way


def test_being_requeued_is_false_outside_a_slurm_job(monkeypatch):
    """Outside a SLURM job (or with a job scontrol does not know) a stop signal is a stop: the sweep
    records the job as interrupted, as before."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert being_requeued() is False
    assert being_requeued({"SLURM_JOB_ID": "999999999"}) is False  # no scontrol, or no such job


def test_a_plain_rerun_is_refused_and_a_restarted_job_continues_only_its_own_work(in_tmp, monkeypatch):
    """A run stopped one step into epoch 2 leaves ``last.pt``. Run again without ``resume=true``:
    refused (exit 1), ``last.pt`` unchanged. The same command in a job SLURM restarted
    (``SLURM_RESTART_COUNT=1``) but with another learning rate: refused too, the restart does not skip
    the same-settings check. With the same settings it continues from ``last.pt`` and completes."""
    for name in SLURM_VARS:  # this test may itself run inside a SLURM job
        monkeypatch.delenv(name, raising=False)
    run_dir = in_tmp / "run"
    command = TINY + [f"hydra.run.dir={run_dir}"]
    with active(StopAt(TINY_STEPS + 1)):
        run_hydra(hs_main, command, expect_exit=130)
    before = (run_dir / "last.pt").read_bytes()
    assert read_json(run_dir / "metrics.json")["status"] == "interrupted"

    run_hydra(hs_main, command, expect_exit=1)
    assert (run_dir / "last.pt").read_bytes() == before

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run_hydra(hs_main, command + ["optim.lr=0.5"], expect_exit=1)
    assert (run_dir / "last.pt").read_bytes() == before

    run_hydra(hs_main, command)
    done = read_json(run_dir / "metrics.json")
    assert done["status"] == "completed" and done["steps"] == 2 * TINY_STEPS
    log = (run_dir / "app.log").read_text()
    assert "restarted by the scheduler (SLURM_RESTART_COUNT=1)" in log
    assert "at epoch 1, step 1" in log  # "resumed from ... at epoch 1, step 1"


# ------------------------------------------------------------------ on a cluster


def _cluster_missing() -> str | None:
    """Why no SLURM test can run here; None when a cluster answers with a usable node."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no SLURM cluster: sbatch/sinfo not on the PATH (start one: bash scripts/slurm_cluster.sh up)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "no SLURM cluster: sinfo did not answer in 20 s"
    if out.returncode != 0:
        return f"no SLURM cluster: sinfo failed ({out.stderr.strip()[:200]})"
    if not {"idle", "mix", "alloc"} & set(out.stdout.split()):
        return f"no usable SLURM node (sinfo states: {' '.join(out.stdout.split()) or 'none'})"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = _cluster_missing()
    if reason is not None:
        pytest.skip(reason)


def _job(job_id: str) -> dict[str, str]:
    """``JobState``, ``Restarts`` and ``Reason`` of a job as ``scontrol`` reports it (kept ~5 min after it ends)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"\b(JobState|Restarts|Reason)=(\S+)", out.stdout))


def _state(job_id: str) -> str:
    return _job(job_id).get("JobState", "UNKNOWN")


def _submit(folder: Path, name: str, command: list[str]) -> str:
    """``sbatch`` a one-CPU job that runs ``command`` in ``folder``; its output goes to ``folder/name.out``
    (appended: a requeued job's second run adds to it). Returns the job id."""
    script = folder / f"{name}.sbatch"
    script.write_text(
        "\n".join(
            [
                "#!/bin/bash",
                f"#SBATCH --job-name=repopt-test-{name}",
                "#SBATCH --cpus-per-task=1",
                "#SBATCH --mem=2G",
                "#SBATCH --time=15",
                "#SBATCH --requeue",
                "#SBATCH --open-mode=append",
                f"#SBATCH --output={folder / (name + '.out')}",
                f"cd {shlex.quote(str(folder))}",
                f"exec {shlex.join(command)}",
                "",
            ]
        )
    )
    done = subprocess.run(
        ["sbatch", "--parsable", str(script)], cwd=folder, env=_env(), capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip().split(";")[0]


def _output(folder: Path, name: str) -> str:
    path = folder / f"{name}.out"
    return path.read_text(errors="replace")[-4000:] if path.is_file() else "(no output)"


def slurm_sweep(sweep: Path, overrides: list[str]) -> list[str]:
    """A two-job pipeline sweep (``hs.optim.lr=0.05,0.2``) through ``hydra/launcher=slurm_cpu``, one CPU per job."""
    return [
        *(sys.executable, "-m", "pipelines.search_and_train", "-m", "hydra/launcher=slurm_cpu"),
        *("hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"),
        *overrides,
        "hs.optim.lr=0.05,0.2",
        f"hydra.sweep.dir={sweep}",
    ]


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_a_pipeline_sweep_on_slurm_then_compare(tmp_path, cluster):
    """``python -m pipelines.search_and_train -m hydra/launcher=slurm_cpu`` with two settings: an array
    of two SLURM jobs (one CPU each) that both complete, submitit's files under the sweep dir, and
    ``pipelines.compare`` reads the sweep as two rows."""
    sweep = tmp_path / "sweep"
    command = slurm_sweep(sweep, pipeline_overrides())
    done = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=280)
    output = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, output
    assert "sweep: 2 jobs completed" in done.stderr, output
    for job in ("0", "1"):
        joined = read_json(sweep / job / "metrics.json")
        assert joined["status"] == "completed", joined
        assert joined["scales_sha256"] == joined["hs_scales_sha256"]
        hydra_job = (sweep / job / ".hydra" / "hydra.yaml").read_text()
        assert re.search(r"\n    id: '?\d+_" + job + r"'?\n", hydra_job), "the job ran as a SLURM array task"
    scripts = list((sweep / ".submitit").rglob("*_submission.sh"))
    assert scripts, "submitit's folder is under the sweep dir"
    assert "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK;" in scripts[0].read_text()  # slurm_cpu.yaml's setup line

    table = compare([sweep], plots=False)
    assert len(table) == 2
    frame = pd.read_csv(sweep / "comparison.csv")
    assert sorted(frame["hs.optim.lr"]) == [0.05, 0.2]
    assert list(frame["status"]) == ["completed", "completed"]
    for column in ("hs_top1", "target_top1"):
        assert frame[column].map(math.isfinite).all()


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_a_job_requeued_mid_run_continues_by_itself_and_ends_as_an_uninterrupted_run(tmp_path, cluster):
    """An ``sbatch`` job runs ``python -m hypersearch`` (no ``resume=true``); once epoch 1 has written
    ``last.pt`` it is requeued with ``scontrol requeue``: SLURM sends SIGTERM, the run writes ``last.pt``
    inside its epoch and records ``interrupted``. SLURM starts the job again (same job id, restart count
    1) and the same command continues from ``last.pt`` by itself. Its metrics, history and scales file
    equal those of an uninterrupted job of the same command (run beside it), bit for bit."""
    epochs = 6  # epoch 1 is the signal to requeue; the others are the margin of a loaded machine
    command = [sys.executable, "-m", "hypersearch", *SIGNAL_RUN, f"epochs={epochs}"]
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    jobs: list[str] = []
    try:
        jobs.append(_submit(tmp_path, "reference", command + [f"hydra.run.dir={reference}"]))
        jobs.append(_submit(tmp_path, "requeued", command + [f"hydra.run.dir={run_dir}"]))
        ref_id, job_id = jobs
        wait_until(lambda: (run_dir / "last.pt").exists() or _state(job_id) in FINISHED, timeout=150, interval=0.05)
        assert _state(job_id) == "RUNNING", _output(tmp_path, "requeued")
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)

        # SIGTERM: the run stops at a step boundary; then SLURM holds the requeued job for ~2 minutes
        # (BeginTime) before it may start again, a scheduling delay the test lifts
        assert wait_until(lambda: _state(job_id) == "PENDING", timeout=60, interval=0.2), _job(job_id)
        interrupted = read_json(run_dir / "metrics.json")
        assert interrupted["status"] == "interrupted", (interrupted, _output(tmp_path, "requeued"))
        assert "received SIGTERM" in (run_dir / "app.log").read_text()
        position = load_checkpoint(run_dir / "last.pt")["run"]
        assert 1 <= position["epoch"] < epochs and 0 <= position["step_in_epoch"] < SIGNAL_STEPS, position
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True, timeout=30)

        assert wait_until(lambda: _state(job_id) in FINISHED, timeout=180, interval=0.5), _job(job_id)
        assert wait_until(lambda: _state(ref_id) in FINISHED, timeout=60, interval=0.5), _job(ref_id)
    finally:
        for job in jobs:
            if _state(job) not in FINISHED:
                subprocess.run(["scancel", job], timeout=30)
    assert _job(job_id) == {"JobState": "COMPLETED", "Restarts": "1", "Reason": "None"}, _output(tmp_path, "requeued")
    assert _state(ref_id) == "COMPLETED", _output(tmp_path, "reference")
    log = (run_dir / "app.log").read_text()
    assert "restarted by the scheduler (SLURM_RESTART_COUNT=1)" in log
    assert f"at epoch {position['epoch']}, step {position['step_in_epoch']}" in log  # "resumed from ..."

    done, full = read_json(run_dir / "metrics.json"), read_json(reference / "metrics.json")
    assert done["status"] == full["status"] == "completed"
    for key in ("top1", "top5", "loss", "best_top1", "epochs", "steps"):
        assert done[key] == full[key], (key, done[key], full[key])
    pd.testing.assert_frame_equal(
        pd.read_csv(run_dir / "history.csv").drop(columns=TIMING_COLUMNS),
        pd.read_csv(reference / "history.csv").drop(columns=TIMING_COLUMNS),
    )
    assert _sha256(run_dir / "scales.safetensors") == _sha256(reference / "scales.safetensors")


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_a_sweep_job_requeued_mid_run_is_waited_for_and_completes(tmp_path, cluster):
    """A two-job pipeline sweep through ``hydra/launcher=slurm_cpu``; job 0 is requeued with ``scontrol
    requeue`` while stage one trains (SIGTERM, as a pre-emption sends, not submitit's own USR2). It
    writes ``last.pt`` and leaves no result (repopt/scheduler.py, ``being_requeued``), so the launcher
    waits; SLURM runs it again and it continues stage one from ``last.pt`` by itself. The sweep ends
    with both jobs completed and exit 0."""
    sweep = tmp_path / "sweep"
    overrides = [o for o in pipeline_overrides() if not o.startswith(("hs.epochs=", "hs.data.synthetic_train_size="))]
    command = slurm_sweep(sweep, [*overrides, "hs.epochs=20", "hs.data.synthetic_train_size=256"])
    hs_dir, job_id = sweep / "0" / "hs", None
    with open(tmp_path / "sweep.out", "w") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: (hs_dir / "last.pt").exists() or proc.poll() is not None, timeout=150, interval=0.05)
            assert proc.poll() is None, (tmp_path / "sweep.out").read_text()[-4000:]
            job_id = re.search(r"\n    id: '?([0-9_]+)'?\n", (sweep / "0" / ".hydra" / "hydra.yaml").read_text()).group(1)
            subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
            assert wait_until(lambda: _state(job_id) == "PENDING", timeout=60, interval=0.2), _job(job_id)
            assert read_json(hs_dir / "metrics.json")["status"] == "interrupted"
            position = load_checkpoint(hs_dir / "last.pt")["run"]
            subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True, timeout=30)
            returncode = proc.wait(timeout=200)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if job_id is not None and _state(job_id) not in FINISHED:
                subprocess.run(["scancel", job_id], timeout=30)
    output = (tmp_path / "sweep.out").read_text()
    assert returncode == 0, output[-6000:]
    assert "sweep: 2 jobs completed" in output, output[-6000:]
    assert _job(job_id)["Restarts"] == "1"
    for job in ("0", "1"):
        assert read_json(sweep / job / "metrics.json")["status"] == "completed"
    log = (sweep / "0" / "search_and_train.log").read_text()
    assert "restarted by the scheduler (SLURM_RESTART_COUNT=1)" in log
    assert f"resumed from {hs_dir / 'last.pt'} at epoch {position['epoch']}, step {position['step_in_epoch']}" in log


@pytest.mark.slurm
@pytest.mark.timeout(400)
def test_a_study_on_postgresql_with_two_workers_as_a_slurm_array_one_killed(tmp_path, cluster, postgres_url):
    """Two identical ``pipelines.tune`` workers as one SLURM array on one PostgreSQL study; the task seen
    running a trial is SIGKILLed (``scancel --signal=KILL``). The other finishes the study: exactly
    ``n_trials`` complete, the killed trial FAIL and run again once with its parameters, one directory
    per trial number."""
    optuna = pytest.importorskip("optuna")
    from tests.test_tune import _tune_command, write_preset
    from tests.test_tune_postgres import FINISHED as TRIAL_DONE
    from tests.test_tune_postgres import STARTED, _states

    conf = write_preset(tmp_path / "conf")
    study_dir, n_trials = tmp_path / "study", 3
    command = _tune_command(conf, study_dir, f"n_trials={n_trials}", "grace_period=2", f"storage='{postgres_url}'")
    script = tmp_path / "workers.sbatch"
    script.write_text(
        "\n".join(
            [
                "#!/bin/bash",
                "#SBATCH --job-name=repopt-test-study",
                "#SBATCH --array=0-1",
                "#SBATCH --cpus-per-task=1",
                "#SBATCH --mem=2G",
                "#SBATCH --time=15",
                f"#SBATCH --output={tmp_path / 'worker%a.out'}",
                f"cd {shlex.quote(str(tmp_path))}",
                f"exec {shlex.join(command)}",
                "",
            ]
        )
    )
    job = (
        subprocess.run(
            ["sbatch", "--parsable", str(script)],
            cwd=tmp_path,
            env=_env(1),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        .stdout.strip()
        .split(";")[0]
    )
    logs = [tmp_path / f"worker{i}.out" for i in range(2)]

    def read(path: Path) -> str:
        return path.read_text(errors="replace") if path.is_file() else ""

    def output_of(paths) -> str:
        return "\n".join(read(p)[-3000:] for p in paths)

    try:
        running: list[tuple[int, int]] = []  # (array task, trial number) of a worker inside a trial

        def a_trial_runs() -> bool:
            for i, log in enumerate(logs):
                m = STARTED.search(read(log))
                if m and _states(postgres_url).get(int(m.group(1))) == "RUNNING":
                    running.append((i, int(m.group(1))))
                    return True
            return False

        assert wait_until(a_trial_runs, timeout=180, interval=0.2), output_of(logs)
        victim, killed = running[0]
        subprocess.run(["scancel", "--signal=KILL", f"{job}_{victim}"], check=True, timeout=30)
        assert wait_until(lambda: all(_state(f"{job}_{i}") in FINISHED for i in range(2)), timeout=300, interval=0.5), output_of(
            logs
        )
    finally:
        subprocess.run(["scancel", job], timeout=30)
    output = output_of(logs)
    study = optuna.load_study(study_name="tiny", storage=postgres_url)
    states = {t.number: t.state.name for t in study.trials}
    assert states == {**{n: "COMPLETE" for n in range(n_trials + 1) if n != killed}, killed: "FAIL"}, (states, output)
    (rerun,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert rerun.state.name == "COMPLETE" and rerun.params == study.trials[killed].params
    assert sorted(p.name for p in study_dir.glob("trial_*")) == sorted(f"trial_{n}" for n in range(n_trials + 1))
    survivor = logs[1 - victim]
    assert sorted(int(n) for n in TRIAL_DONE.findall(read(survivor)) + TRIAL_DONE.findall(read(logs[victim]))) == sorted(
        n for n, s in states.items() if s == "COMPLETE"
    ), output
