"""Resume with the EMA and mixup / CutMix on: an interrupted run continued with ``resume=true``
replays the uninterrupted one exactly (EMA tensors, weights, history, metrics); other EMA
settings are refused."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from repopt.engine import load_checkpoint
from repopt.engine.callbacks import active
from target_train.app import main as target_main
from tests.helpers.runs import TINY, TINY_STEPS, StopAt, read_json, run_hydra
from tests.test_ema import _inner

TIMING = ["epoch_seconds", "images_per_sec"]


# every=3 does not divide the 4 steps of an epoch, so the resumed segment's updates fall at other positions
EMA_MIX = [
    "scales=init",
    "deploy=false",
    "ema.enabled=true",
    "ema.decay=0.8",
    "ema.every=3",
    "mix.mixup_alpha=0.4",
    "mix.cutmix_alpha=1.0",
    "mix.switch_prob=0.5",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same run without a stop."""
    run_dir = tmp_path_factory.mktemp("ema") / "full"
    run_hydra(target_main, TINY + EMA_MIX + [f"hydra.run.dir={run_dir}"])
    return run_dir


@pytest.mark.parametrize("stop_at", [TINY_STEPS, TINY_STEPS + 1], ids=["after-epoch-1", "mid-epoch-2"])
def test_resume_replays_the_ema_and_the_mixing_exactly(tmp_path, uninterrupted, stop_at):
    full, part = uninterrupted, tmp_path / "part"
    with active(StopAt(stop_at)):
        run_hydra(target_main, TINY + EMA_MIX + [f"hydra.run.dir={part}"], expect_exit=130)
    stopped = load_checkpoint(part / "last.pt")
    assert stopped["run"]["global_step"] == stop_at and stopped["ema"]["n_averaged"] == stop_at // 3
    run_hydra(target_main, TINY + EMA_MIX + ["resume=true", f"hydra.run.dir={part}"])

    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(part / "last.pt")
    assert a["ema"].keys() == b["ema"].keys() and int(a["ema"]["n_averaged"]) == 2 * TINY_STEPS // 3
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    history = [pd.read_csv(d / "history.csv").drop(columns=TIMING) for d in (full, part)]
    pd.testing.assert_frame_equal(*history)
    assert {"ema_test_loss", "ema_test_top1", "ema_test_top5"} <= set(history[0].columns)
    done, ref = read_json(part / "metrics.json"), read_json(full / "metrics.json")
    for key in ("top1", "loss", "best_top1", "ema_top1", "ema_top5", "ema_loss", "ema_best_top1", "steps"):
        assert done[key] == ref[key], key
    assert ref["delivered"] == "ema" and ref["ema_top1"] == history[0]["ema_test_top1"].iloc[-1]
    # the EMA is not the trained model (the comparison is not vacuous)
    assert any(not torch.equal(a["model"][k], _inner(a["ema"])[k]) for k in a["model"])


def test_a_resume_with_other_ema_settings_is_refused(tmp_path, uninterrupted, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copyfile(uninterrupted / "last.pt", run_dir / "last.pt")
    before = (run_dir / "last.pt").read_bytes()
    other = [o.replace("ema.decay=0.8", "ema.decay=0.99") for o in EMA_MIX]
    run_hydra(target_main, TINY + other + ["resume=true", f"hydra.run.dir={run_dir}"], expect_exit=1)
    assert "ema.decay: 0.8 -> 0.99" in capsys.readouterr().err
    assert (run_dir / "last.pt").read_bytes() == before
