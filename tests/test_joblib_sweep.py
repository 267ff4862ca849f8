"""Concurrent jobs: a Hydra multirun through the joblib launcher (real ``python -m hypersearch``
processes, two at a time) gives complete, distinct job directories. ``docs/reliability.md``
summarizes what the test shows.
"""

from __future__ import annotations

import subprocess
import sys

import pandas as pd

from repopt.engine import load_checkpoint
from tests.helpers.runs import TINY, _env, _sha256, read_json


def test_joblib_sweep_of_four_seeds_gives_four_complete_distinct_jobs(tmp_path):
    """``python -m hypersearch -m hydra/launcher=joblib hydra.launcher.n_jobs=2 seed=0,1,2,3``: four job
    directories 0..3, each complete (status completed, scales, history, last.pt), each with its own
    overrides naming its seed and a checkpoint of that seed; the four scales files differ pairwise; the
    sweep ends with its summary line."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "hypersearch",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=0,1,2,3",
        *TINY,
        "epochs=1",
        f"hydra.sweep.dir={sweep}",
    ]
    done = subprocess.run(command, check=False, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Joblib.Parallel(n_jobs=2" in output, output
    assert "sweep: 4 jobs completed" in done.stderr, output  # repopt/sweep.py: the summary of the sweep
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    digests = []
    for seed, job in enumerate(jobs):
        for name in ("metrics.json", "scales.safetensors", "history.csv", "last.pt", "app.log", ".hydra/overrides.yaml"):
            assert (job / name).is_file(), (job, name)
        assert read_json(job / "metrics.json")["status"] == "completed"
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        assert f"seed={seed}" in overrides and all(f"seed={s}" not in overrides for s in range(4) if s != seed)
        assert load_checkpoint(job / "last.pt")["config"]["seed"] == seed
        assert len(pd.read_csv(job / "history.csv")) == 1
        assert not list(job.glob(".*.tmp"))
        digests.append(_sha256(job / "scales.safetensors"))
    assert len(set(digests)) == 4, digests
