"""Stage one end to end: the Hydra app, its files, multirun, exact resume."""

import pandas as pd
import pytest
import torch

from hypersearch.app import main as hs_main
from repopt import get_arch, load_scales, read_metadata
from repopt.engine.callbacks import active
from tests.helpers.fake_datasets import write_fake_cifar100
from tests.helpers.runs import TINY, StopAt, read_json, run_hydra

RUN_FILES = [
    "metrics.json",
    "history.csv",
    "last.pt",
    "scales.safetensors",
    "scales.csv",
    "scales.png",
    ".hydra/config.yaml",
    ".hydra/overrides.yaml",
]


def _assert_run_files(run_dir):
    missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
    assert not missing, missing


def test_hypersearch_on_cifar100_format_end_to_end(in_tmp):
    write_fake_cifar100(in_tmp / "c100", n_train=160, n_test=80, num_classes=100)
    run_dir = in_tmp / "run"
    overrides = [o for o in TINY if not o.startswith("data.synthetic") and o != "data=synthetic"]
    run_hydra(
        hs_main,
        overrides
        + [
            "data=cifar100",
            f"data.root={in_tmp / 'c100'}",
            "data.download=false",
            "data.verify_checksums=false",
            f"hydra.run.dir={run_dir}",
        ],
    )
    _assert_run_files(run_dir)
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert 0.0 <= metrics["top1"] <= 100.0 and metrics["images_per_sec"] > 0 and metrics["device"]
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [1, 2] and history["test_top1"].notna().all()
    arch = get_arch("tiny", [1, 2, 2, 2, 1])
    scales = load_scales(run_dir, arch)
    init = arch.init_scales()
    moved = max(float((scales[k] - init[k]).abs().max()) for k in scales)
    assert moved > 1e-4, "the scales did not learn"
    meta = read_metadata(run_dir / "scales.safetensors")
    assert meta["dataset"] == "cifar100" and meta["num_classes"] == 100
    assert meta["hs_top1"] == metrics["top1"] and meta["arch"]["name"] == "tiny"
    assert meta["format"] == "repopt-scales" and "created" not in meta and meta["config"]["epochs"] == 2
    summary = pd.read_csv(run_dir / "scales.csv")
    assert set(summary["key"]) == set(arch.scale_shapes())


def test_hypersearch_multirun_two_settings(in_tmp):
    sweep_dir = in_tmp / "sweep"
    run_hydra(hs_main, ["-m"] + TINY + ["epochs=1", "optim.lr=0.05,0.1", f"hydra.sweep.dir={sweep_dir}"])
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        _assert_run_files(job)
    lrs = [read_json(j / "metrics.json") and (j / ".hydra/overrides.yaml").read_text() for j in jobs]
    assert "optim.lr=0.05" in lrs[0] and "optim.lr=0.1" in lrs[1]
    a, b = (load_scales(j, get_arch("tiny", [1, 2, 2, 2, 1])) for j in jobs)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_after_interruption_matches_uninterrupted(in_tmp):
    common = TINY + ["epochs=3"]
    run_hydra(hs_main, common + [f"hydra.run.dir={in_tmp / 'full'}"])
    full = read_json(in_tmp / "full" / "metrics.json")

    steps_per_epoch = 128 // 32
    for name, step in (("end_of_epoch", steps_per_epoch), ("mid_epoch", steps_per_epoch + 2)):
        run_dir = in_tmp / name
        with active(StopAt(step)):
            run_hydra(hs_main, common + [f"hydra.run.dir={run_dir}"], expect_exit=130)
        partial = read_json(run_dir / "metrics.json")
        assert partial["status"] == "interrupted" and partial["steps"] == step
        run_hydra(hs_main, common + ["resume=true", f"hydra.run.dir={run_dir}"])
        resumed = read_json(run_dir / "metrics.json")
        assert resumed["status"] == "completed"
        for key in ("top1", "top5", "loss", "epochs", "steps"):
            assert resumed[key] == full[key], (name, key, resumed[key], full[key])
        pd.testing.assert_frame_equal(
            pd.read_csv(run_dir / "history.csv").drop(columns=["epoch_seconds", "images_per_sec"]),
            pd.read_csv(in_tmp / "full" / "history.csv").drop(columns=["epoch_seconds", "images_per_sec"]),
        )
        a, b = (
            load_scales(run_dir, get_arch("tiny", [1, 2, 2, 2, 1])),
            load_scales(in_tmp / "full", get_arch("tiny", [1, 2, 2, 2, 1])),
        )
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_checkpoint_without_resume_is_refused(in_tmp):
    run_dir = in_tmp / "run"
    run_hydra(hs_main, TINY + ["epochs=1", f"hydra.run.dir={run_dir}"])
    before = (run_dir / "last.pt").read_bytes()
    run_hydra(hs_main, TINY + ["epochs=1", f"hydra.run.dir={run_dir}"], expect_exit=1)
    assert (run_dir / "last.pt").read_bytes() == before
    assert read_json(run_dir / "metrics.json")["status"] == "completed"


@pytest.mark.slow
def test_compiled_training_matches_eager_closely(in_tmp):
    """compile=true runs the same training through torch.compile (slow on a CPU: ~1-2 min of compiling)."""
    run_hydra(hs_main, TINY + ["epochs=1", f"hydra.run.dir={in_tmp / 'eager'}"])
    run_hydra(hs_main, TINY + ["epochs=1", "compile=true", f"hydra.run.dir={in_tmp / 'compiled'}"])
    eager, compiled = read_json(in_tmp / "eager" / "metrics.json"), read_json(in_tmp / "compiled" / "metrics.json")
    assert compiled["status"] == "completed"
    assert abs(eager["loss"] - compiled["loss"]) <= 1e-3 * abs(eager["loss"])


def test_submitit_local_launcher_runs_a_sweep(in_tmp):
    """The submitit launcher (what SLURM uses) in its local mode: two jobs, each a complete run."""
    import os
    import subprocess
    import sys

    sweep = in_tmp / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "hypersearch",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        *TINY,
        "epochs=1",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(
        cmd, cwd=in_tmp, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        _assert_run_files(sweep / job)
        assert read_json(sweep / job / "metrics.json")["status"] == "completed"
