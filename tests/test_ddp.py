"""DDP on CPU: two gloo processes with a global batch of 32 end where one process ends."""

import os
import shutil
import subprocess
import sys

import pytest

from repopt.engine import load_checkpoint
from tests.helpers.runs import DDP_BOUND, TINY, read_json, worst_rel_diff

pytestmark = pytest.mark.skipif(
    shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun not installed",
)


def _torchrun():
    local = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return local if os.path.exists(local) else shutil.which("torchrun")


def _run(cmd, env, cwd):
    proc = subprocess.run(cmd, env=env, cwd=cwd, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd[:4]))} ... exited {proc.returncode}:\n{proc.stderr[-4000:]}"


def test_two_process_gloo_equals_one_process(tmp_path):
    overrides = TINY + ["epochs=2", "scales=init", "deploy=false", "optim.lr=0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "target_train", *overrides, f"hydra.run.dir={one}"], env, tmp_path)
    _run(
        [_torchrun(), "--standalone", "--nproc-per-node=2", "-m", "target_train", *overrides, f"hydra.run.dir={two}"],
        env,
        tmp_path,
    )
    m1, m2 = read_json(one / "metrics.json"), read_json(two / "metrics.json")
    assert m2["world_size"] == 2 and m1["world_size"] == 1 and m2["steps"] == m1["steps"]
    a, b = load_checkpoint(one / "last.pt")["model"], load_checkpoint(two / "last.pt")["model"]
    worst = worst_rel_diff(a, b)
    assert worst <= DDP_BOUND, worst
    # and the weights really moved during training (the comparison is not vacuous)
    assert abs(m1["loss"] - m2["loss"]) <= 1e-3 * abs(m1["loss"])
