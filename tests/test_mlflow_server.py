"""``logger=mlflow`` against a real MLflow tracking server (``mlflow server`` on 127.0.0.1, started
by the test), as a cluster's jobs use one: two pipeline jobs run in parallel (the joblib launcher),
each talking to the server over HTTP. Read back with ``MlflowClient``: every run finished, each
stage's run nested under its job's run, the epochs' metrics there, and the files uploaded through
the server (``--serve-artifacts``) into its artifact store.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.runs import _env, pipeline_overrides, read_json

mlflow = pytest.importorskip("mlflow")

SERVER_START_S = 120  # a loaded 2-core machine: importing mlflow and migrating a new SQLite store take a while


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` with an SQLite backend and proxied artifacts in ``tmp_path/server``, on a free
    loopback port: its URL and folder. Stopped (its whole process group: the web workers too) after."""
    root = tmp_path / "server"
    root.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # no job runner (scheduled server-side jobs, a process of its own): nothing here uses it, and it
    # doubles the start and stop time on a small machine
    env = dict(_env(1), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _answers(url):
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited with {server.returncode}:\n{log_path.read_text()[-5000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer within {SERVER_START_S} s:\n{log_path.read_text()[-5000:]}")
            time.sleep(0.5)
        yield url, root
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        try:  # a web worker that outlived the server process
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_parallel_pipeline_jobs_log_to_a_tracking_server(tmp_path, mlflow_server):
    url, root = mlflow_server
    sweep = tmp_path / "sweep"
    lrs = ("0.1", "0.2")
    command = [
        sys.executable,
        "-m",
        "pipelines.search_and_train",
        "-m",
        "hydra/launcher=local_parallel",
        f"hs.optim.lr={','.join(lrs)}",
        *pipeline_overrides(),
        "target.optim.compile_step=false",
        "logger=mlflow",
        f"logger.tracking_uri={url}",
        f"hydra.sweep.dir={sweep}",
    ]
    done = subprocess.run(command, check=False, cwd=tmp_path, env=_env(1), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr and "sweep: 2 jobs completed" in done.stderr

    client = mlflow.MlflowClient(url)
    experiment = client.get_experiment_by_name("repopt")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's store, not a path of the client's
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id], max_results=100)}
    assert len(runs) == 6  # per job: its run, and one per stage
    jobs = {run.data.tags["repopt.run_dir"]: run for run in runs.values() if run.data.tags["repopt.stage"] == "search_and_train"}
    assert sorted(Path(d).name for d in jobs) == ["0", "1"]
    for job_dir, job in jobs.items():
        job_dir = Path(job_dir)
        assert job.info.status == "FINISHED" and "mlflow.parentRunId" not in job.data.tags
        assert job.data.params["hs.optim.lr"] == lrs[int(job_dir.name)]
        joined = read_json(job_dir / "metrics.json")
        assert joined["status"] == "completed" and job.data.metrics["top1"] == joined["top1"]
        assert {a.path for a in client.list_artifacts(job.info.run_id)} == {"metrics.json"}
        children = {
            run.data.tags["repopt.stage"]: run
            for run in runs.values()
            if run.data.tags.get("mlflow.parentRunId") == job.info.run_id
        }
        assert set(children) == {"hypersearch", "target_train"}
        for stage, folder, files in (
            ("hypersearch", "hs", {"metrics.json", "history.csv", "scales.safetensors"}),
            ("target_train", "target", {"metrics.json", "history.csv"}),
        ):
            run, metrics = children[stage], read_json(job_dir / folder / "metrics.json")
            assert run.info.status == "FINISHED" and run.data.tags["repopt.status"] == "completed"
            assert run.data.tags["repopt.run_dir"] == str(job_dir / folder)
            assert read_json(job_dir / folder / "mlflow_run.json")["run_id"] == run.info.run_id
            history = client.get_metric_history(run.info.run_id, "test_top1")
            assert [(m.step, m.value) for m in history] == [(1, metrics["top1"])]
            assert run.data.metrics["top1"] == metrics["top1"]
            assert {a.path for a in client.list_artifacts(run.info.run_id)} == files
            # uploaded through the server: the bytes are in its artifact store, identical to the run directory's
            stored = list((root / "artifacts").rglob(f"{run.info.run_id}/artifacts/metrics.json"))
            assert len(stored) == 1 and stored[0].read_bytes() == (job_dir / folder / "metrics.json").read_bytes()
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlruns").exists()  # nothing stored on the client's side
