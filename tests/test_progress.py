"""Progress in every log, and string settings checked with the config (issue: a command line that respects the user)."""

from __future__ import annotations

import re

import pytest

from hypersearch.app import main as hs_main
from repopt.engine.progress import EpochProgress
from tests.helpers.runs import TINY, TINY_STEPS, run_hydra


def test_progress_log_reports_step_loss_speed_and_eta(tmp_path):
    overrides = [o for o in TINY if not o.startswith("progress=")]
    run_dir = tmp_path / "run"
    run_hydra(hs_main, overrides + ["progress=log", "progress_every_s=1e-9", f"hydra.run.dir={run_dir}"])
    log_file = (run_dir / "app.log").read_text()  # the run's own log file has them, not only the terminal
    lines = [line.split(" - ", 1)[1] for line in log_file.splitlines() if "[repopt.progress]" in line]
    pattern = re.compile(r"^epoch (\d)/2  step (\d+)/(\d+)  loss (\d+\.\d{4})  (\d+) img/s  ETA \d+:\d\d:\d\d$")
    parsed = [pattern.match(line) for line in lines]
    assert lines and all(parsed), lines
    # a line after every step but the last of each epoch (that one is the epoch's own summary line)
    assert [(int(m[1]), int(m[2])) for m in parsed] == [(e, s) for e in (1, 2) for s in range(1, TINY_STEPS)]
    assert all(int(m[3]) == TINY_STEPS and 1.0 < float(m[4]) < 5.0 for m in parsed)


def test_auto_progress_logs_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert EpochProgress("auto", 0, 1, 0, 10, 30.0).mode == "log"
    assert EpochProgress("auto", 0, 1, 0, 10, 30.0, show=False).mode == "off"


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.name=sgdd", "optim.name"),
        ("sched.name=cosine", "sched.name"),
        ("amp=fp8", "amp"),
        ("progress=verbose", "progress"),
        ("progress_every_s=0", "progress_every_s"),
    ],
)
def test_string_settings_are_checked_before_anything_runs(tmp_path, capsys, override, key):
    run_dir = tmp_path / "run"
    run_hydra(hs_main, TINY + [override, f"hydra.run.dir={run_dir}"], expect_exit=1)
    err = capsys.readouterr()
    assert f"error: {key}=" in err.err and "must be" in err.err
    assert "data synthetic" not in err.out + err.err  # refused before the data was loaded
    assert not (run_dir / "last.pt").exists()


def test_tune_help_and_a_missing_study_are_one_line_not_a_traceback(tmp_path):
    import subprocess
    import sys

    from tests.helpers.runs import _env

    shown = subprocess.run(
        [sys.executable, "-m", "pipelines.tune", "--help"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0 and "Traceback" not in shown.stderr and "tune" in shown.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "pipelines.tune"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "error: no search space: choose a study with tune=<name> (hs_recipe, quickstart)" in missing.stderr


def test_compare_into_an_unwritable_place_is_one_line(tmp_path, capsys):
    from pipelines.compare import main as compare_main
    from repopt.results import StageMetrics, Status, write_result

    job = tmp_path / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    write_result(job / "metrics.json", StageMetrics(status=Status.COMPLETED, stage="hypersearch", top1=50.0))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert compare_main([str(tmp_path / "sweep"), "--out", str(blocker / "out"), "--no-plots"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write the comparison into {blocker / 'out'}") and "--out DIR" in err
    assert "Traceback" not in err and blocker.read_text() == "not a folder"


def test_stage_two_says_where_it_runs_and_which_scales_it_loaded(tmp_path, capsys, artifacts):
    from target_train.app import main as target_main

    run_dir = tmp_path / "run"
    run_hydra(target_main, TINY + ["epochs=1", f"scales={artifacts['run_dir']}", f"hydra.run.dir={run_dir}"])
    out = capsys.readouterr().out
    assert (
        f"run directory {run_dir}; target with RepOptSGD; scales: file {artifacts['run_dir'] / 'scales.safetensors'} (sha256 "
        in out
    )
