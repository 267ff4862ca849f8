"""Errors found before training starts: an unusable device, an unwritable run directory, missing data,
and ``resume=true`` with settings that do not fit the checkpoint. Each is one clear message and exit 1,
and nothing already in the run directory is damaged. ``docs/reliability.md`` summarizes what each
test shows.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from hypersearch.app import main as hs_main
from tests.helpers.runs import TINY, read_json, run_hydra


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_fails_before_training(in_tmp, capsys):
    run_dir = in_tmp / "run"
    run_hydra(hs_main, TINY + ["device=cuda", f"hydra.run.dir={run_dir}"], expect_exit=1)
    err = capsys.readouterr().err
    assert "device=cuda" in err and "no usable CUDA GPU" in err and "Traceback" not in err
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "failed" and "CUDA" in metrics["error"]
    assert not (run_dir / "last.pt").exists()


def test_run_dir_below_a_regular_file_fails_before_training(in_tmp, capsys):
    """``run_dir=<file>/run`` (the app's own run directory): exit 1 with the project's one-line message."""
    blocker = in_tmp / "blocker"
    blocker.write_text("a regular file")
    run_hydra(hs_main, TINY + [f"hydra.run.dir={in_tmp / 'hydra'}", f"run_dir={blocker / 'run'}"], expect_exit=1)
    err = capsys.readouterr().err
    assert f"run directory {blocker / 'run'} is not writable" in err and "Traceback" not in err
    assert blocker.read_text() == "a regular file"
    assert not list((in_tmp / "hydra").glob("last.pt"))


def test_hydra_run_dir_below_a_regular_file_fails_before_training(in_tmp, capsys):
    """``hydra.run.dir=<file>/run``: Hydra creates the directory before the app starts; the apps'
    ``OutputDirCheck`` callback (repopt/app.py) tries first and says it in the project's one line: exit 1."""
    blocker = in_tmp / "blocker"
    blocker.write_text("a regular file")
    run_hydra(hs_main, TINY + [f"hydra.run.dir={blocker / 'run'}"], expect_exit=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: output directory {blocker / 'run'} (hydra.run.dir) cannot be created (Not a directory); "
        f"choose another with hydra.run.dir=..."
    ]
    assert blocker.read_text() == "a regular file"


def test_missing_image_folder_fails_before_training(in_tmp, capsys):
    run_dir = in_tmp / "run"
    missing = in_tmp / "no-such-data"
    overrides = [o for o in TINY if not o.startswith("data")] + ["data=imagefolder", f"data.root={missing}"]
    run_hydra(hs_main, overrides + [f"hydra.run.dir={run_dir}"], expect_exit=1)
    err = capsys.readouterr().err
    assert f"data.root {missing} does not exist" in err and "Traceback" not in err
    assert read_json(run_dir / "metrics.json")["status"] == "failed"
    assert not (run_dir / "last.pt").exists()


def test_resume_with_another_class_count_is_refused_and_keeps_the_checkpoint(artifacts, in_tmp, capsys):
    """``resume=true`` with ``data.synthetic_num_classes=5`` on a 10-class run: exit 1, the message names
    num_classes, last.pt and metrics.json are unchanged."""
    run_dir = in_tmp / "run"
    shutil.copytree(artifacts["run_dir"], run_dir)
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "metrics.json", "history.csv")}
    run_hydra(
        hs_main, TINY + ["epochs=2", "resume=true", "data.synthetic_num_classes=5", f"hydra.run.dir={run_dir}"], expect_exit=1
    )
    err = capsys.readouterr().err
    assert "data.synthetic_num_classes: 10 -> 5" in err and "Traceback" not in err
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_resume_with_more_epochs_is_refused_or_honoured(artifacts, in_tmp):
    """Resuming a finished 1-epoch run with ``epochs=2``: either refused (exit 1) or the second epoch
    really trains (lr > 0). Silently training it at lr 0 is neither."""
    run_dir = in_tmp / "run"
    shutil.copytree(artifacts["run_dir"], run_dir)
    try:
        run_hydra(hs_main, TINY + ["epochs=2", "resume=true", f"hydra.run.dir={run_dir}"])
    except SystemExit as exc:
        assert exc.code == 1
        return
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 2 and history.loc[1, "lr"] > 0, history
