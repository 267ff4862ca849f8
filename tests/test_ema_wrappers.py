"""The EMA behind the wrappers the trainer puts around the model: DDP (two gloo processes on the CPU)
and torch.compile (slow on a CPU, kept out of the default run). Both average the raw module."""

from __future__ import annotations

import subprocess

import pytest

from repopt.engine import load_checkpoint
from target_train.app import main as target_main
from tests.helpers.runs import DDP_BOUND, TINY, TINY_STEPS, _env, read_json, run_hydra, worst_rel_diff
from tests.test_ddp import _torchrun

EMA = ["scales=init", "deploy=false", "ema.enabled=true", "ema.decay=0.7"]


@pytest.mark.skipif(_torchrun() is None, reason="torchrun not installed")
def test_two_process_ddp_ema_equals_one_process(tmp_path):
    overrides = TINY + EMA + ["epochs=1"]
    env = _env(threads=1)  # PYTHONPATH: the children import this checkout, not an installed copy
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run(
        [_torchrun(), "--standalone", "--nproc-per-node=2", "-m", "target_train", *overrides, f"hydra.run.dir={two}"],
        check=False,
        env=env,
        cwd=tmp_path,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_hydra(target_main, overrides + [f"hydra.run.dir={one}"])  # the one-process reference, in this process
    m1, m2 = read_json(one / "metrics.json"), read_json(two / "metrics.json")
    assert (m1["world_size"], m2["world_size"]) == (1, 2) and m1["delivered"] == m2["delivered"] == "ema"
    a, b = load_checkpoint(one / "last.pt")["ema"], load_checkpoint(two / "last.pt")["ema"]
    assert int(a["n_averaged"]) == int(b["n_averaged"]) == TINY_STEPS
    assert worst_rel_diff(a, b) <= DDP_BOUND  # BN buffers included: SyncBN gives every rank the global statistics
    assert abs(m1["ema_loss"] - m2["ema_loss"]) <= 1e-3 * abs(m1["ema_loss"])


@pytest.mark.slow
def test_compiled_training_keeps_the_ema_of_the_raw_module(in_tmp):
    """compile=true with the EMA and mixing on: the same EMA as eager, up to compiled numerics (~1-2 min)."""
    mix = ["mix.mixup_alpha=0.4", "mix.cutmix_alpha=1.0"]
    run_hydra(target_main, TINY + EMA + mix + ["epochs=1", f"hydra.run.dir={in_tmp / 'eager'}"])
    run_hydra(target_main, TINY + EMA + mix + ["epochs=1", "compile=true", f"hydra.run.dir={in_tmp / 'compiled'}"])
    a, b = load_checkpoint(in_tmp / "eager" / "last.pt"), load_checkpoint(in_tmp / "compiled" / "last.pt")
    assert not any(k.startswith(("_orig_mod", "module.module")) for k in b["ema"])  # the raw module's keys
    assert worst_rel_diff(a["ema"], b["ema"], floor=1e-12) <= 1e-3
    assert read_json(in_tmp / "compiled" / "metrics.json")["status"] == "completed"
