"""Non-finite losses: an absurd learning rate from the start, divergence after a good epoch (the epoch's
checkpoint is kept), and a diverged job inside a pipeline sweep. ``docs/reliability.md`` summarizes
what each test shows.
"""

from __future__ import annotations

import pandas as pd

from hypersearch.app import main as hs_main
from pipelines.compare import main as compare_main
from pipelines.search_and_train import main as pipeline_main
from repopt.engine import load_checkpoint
from repopt.engine.callbacks import active
from tests.helpers.runs import (
    TINY,
    TINY_STEPS,
    _all_finite,
    _RecordEpochCheckpoints,
    _sha256,
    pipeline_overrides,
    read_json,
    run_hydra,
)


def test_absurd_learning_rate_diverges_with_exit_1(in_tmp):
    """``optim.lr=1e30`` without warm-up: exit 1, metrics.json status diverged with the integer step.
    The loss turns non-finite inside epoch 1, so there is no good checkpoint to keep and none is written."""
    run_dir = in_tmp / "run"
    run_hydra(hs_main, TINY + ["epochs=1", "optim.lr=1e30", "sched.warmup_epochs=0", f"hydra.run.dir={run_dir}"], expect_exit=1)
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "diverged", metrics
    assert isinstance(metrics["diverged_step"], int) and 0 <= metrics["diverged_step"] < TINY_STEPS
    assert "non-finite loss" in metrics["error"]
    assert not (run_dir / "last.pt").exists() and not (run_dir / "scales.safetensors").exists()


def test_divergence_in_epoch_2_keeps_the_epoch_1_checkpoint(in_tmp):
    """Epoch 1 trains normally; from epoch 2 on the learning rate is 1e30 (set as the schedule's base lr,
    as ``optim.lr=1e30`` would; 1e9 this late in the cosine schedule only gives huge, finite losses).
    Exit 1, status diverged at a step of epoch 2, and last.pt is still the epoch-1 checkpoint, byte for byte, with finite weights; ``resume=true`` (sane lr) continues from it."""
    run_dir = in_tmp / "run"

    def explode_lr(trainer):
        trainer.scheduler.base_lrs = [1e30 for _ in trainer.scheduler.base_lrs]
        for group in trainer.optimizer.param_groups:
            group["lr"] = 1e30

    record = _RecordEpochCheckpoints(then=explode_lr)
    saved = record.saved
    with active(record):
        run_hydra(hs_main, TINY + [f"hydra.run.dir={run_dir}"], expect_exit=1)
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "diverged", metrics
    step = metrics["diverged_step"]
    assert isinstance(step, int) and TINY_STEPS <= step < 2 * TINY_STEPS, step
    assert metrics["epochs"] == 1 and metrics["top1"] is not None  # epoch 1's results are reported
    assert list(saved) == [0] and _sha256(run_dir / "last.pt") == saved[0]
    state = load_checkpoint(run_dir / "last.pt")
    assert state["run"]["epoch"] == 1 and state["run"]["step_in_epoch"] == 0
    assert _all_finite(state["model"].values())
    assert len(pd.read_csv(run_dir / "history.csv")) == 1
    run_hydra(hs_main, TINY + ["resume=true", f"hydra.run.dir={run_dir}"])
    assert read_json(run_dir / "metrics.json")["status"] == "completed"


def test_diverged_job_in_a_pipeline_sweep_is_recorded_and_compared(in_tmp, capsys):
    """``pipelines.search_and_train -m hs.optim.lr=1e30,0.05``: job 0 diverges in stage one, the sweep goes
    on and job 1 completes; ``pipelines.compare`` lists job 0 with status diverged (and its step)."""
    sweep = in_tmp / "sweep"
    run_hydra(pipeline_main, ["-m"] + pipeline_overrides() + ["hs.optim.lr=1e30,0.05", f"hydra.sweep.dir={sweep}"], expect_exit=1)
    bad, good = read_json(sweep / "0" / "metrics.json"), read_json(sweep / "1" / "metrics.json")
    assert bad["status"] == "diverged" and bad["failed_stage"] == "hs", bad
    assert read_json(sweep / "0" / "hs" / "metrics.json")["status"] == "diverged"
    assert not (sweep / "0" / "target").exists()  # stage two never ran on a diverged search
    assert good["status"] == "completed"
    capsys.readouterr()
    assert compare_main([str(sweep), "--no-plots"]) == 0
    frame = pd.read_csv(sweep / "comparison.csv")
    assert list(frame["status"]) == ["diverged", "completed"]
    assert float(frame.loc[0, "hs.optim.lr"]) == 1e30 and frame.loc[0, "failed_stage"] == "hs"
    assert float(frame.loc[0, "diverged_step"]).is_integer()
    md = (sweep / "comparison.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(("| 1e30 ", "| 1e+30 ")))
    assert "diverged" in row, md
