"""What the tests share besides fixtures: the tiny settings, running an app in-process, reading results,
subprocess environments. Fixtures live in tests/conftest.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from repopt.engine.callbacks import Callback

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
CIFAR10_JPEG = SHARED / "data" / "cifar10-jpeg.tar.gz"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Small, fast settings every app test starts from.
TINY = [
    "arch=tiny",
    "arch.strides=[1,2,2,2,1]",
    "data=synthetic",
    "data.batch_size=32",
    "data.synthetic_train_size=128",
    "data.synthetic_test_size=64",
    "epochs=2",
    "sched.warmup_epochs=0.5",
    "progress=off",
    "device=cpu",
]
TINY_STEPS = 128 // 32  # steps per epoch under TINY

# A run long enough to be stopped from outside by a signal: 16 steps (well under a second) per epoch;
# the caller sets epochs.
SIGNAL_RUN = [
    "arch=tiny",
    "arch.strides=[1,2,2,2,1]",
    "data=synthetic",
    "data.image_size=16",
    "data.batch_size=16",
    "data.synthetic_train_size=256",
    "data.synthetic_test_size=32",
    "sched.warmup_epochs=0.5",
    "progress=off",
    "device=cpu",
]
SIGNAL_STEPS = 256 // 16


def wait_until(condition, timeout: float, interval: float = 0.01) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def pipeline_overrides() -> list[str]:
    """The tiny stage settings for both stages of ``pipelines.search_and_train`` (one epoch each)."""
    out = []
    for o in TINY + ["compile=false"]:
        key, value = o.split("=", 1)
        value = {"data.synthetic_train_size": "96", "epochs": "1"}.get(key, value)
        if key in ("arch", "data"):
            out += [f"{key}@hs.{key}={value}", f"{key}@target.{key}={value}"]
        else:
            out += [f"hs.{key}={value}", f"target.{key}={value}"]
    return out + ["target.deploy=false"]


def run_hydra(main, overrides: list[str], expect_exit: int | None = None):
    """Call a ``@hydra.main`` function in this process with ``overrides`` as its command line."""
    argv = sys.argv
    sys.argv = ["app"] + list(overrides)
    try:
        if expect_exit is None:
            return main()
        with pytest.raises(SystemExit) as info:
            main()
        assert info.value.code == expect_exit
        return None
    finally:
        sys.argv = argv


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------ fault injection (the reliability test files)


def _env(threads: int = 1) -> dict:
    """The environment of a child run: unbuffered output and a fixed thread count (the same numerics in
    every child, and two children fit the two cores of a small machine)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def logits_without_the_project(deploy_path: Path, x: torch.Tensor, workdir: Path) -> torch.Tensor:
    """Run a ``deploy.pt`` on ``x`` in a fresh, isolated interpreter that imports none of the project's packages."""
    torch.save(x, workdir / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        with open({str(deploy_path)!r}, "rb") as f:
            m = torch.export.load(f).module()
        out = m(torch.load({str(workdir / "x.pt")!r}))
        assert not any(name.split(".")[0] in ("repopt", "target_train", "hypersearch", "pipelines") for name in sys.modules)
        torch.save(out, {str(workdir / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-I", "-c", script], check=True, cwd=workdir, timeout=120)
    return torch.load(workdir / "out.pt").detach()


# Two-process DDP against one process (float32, CPU): reduction order differs, and the tiny model's
# batch-statistics BNs amplify the rounding to ~2e-4 after eight steps on some CPUs. A 10 % change of
# the learning rate moves the weights by ~2e-3, averaging the gradients wrongly (sum, not mean) by ~1e-2.
DDP_BOUND = 5e-4


def worst_rel_diff(a: dict, b: dict, floor: float = 1.0) -> float:
    """max over tensors of max|a - b| / max(max|a|, floor); integer tensors must be equal.

    The floor keeps tensors near zero (a BN bias of 6e-4 after a few steps) from turning rounding
    into a large relative difference: below ``floor`` the difference counts in absolute terms.
    """
    assert a.keys() == b.keys()
    worst = 0.0
    for key, value in a.items():
        if value.is_floating_point():
            worst = max(worst, float((value - b[key]).abs().max() / value.abs().max().clamp_min(floor)))
        else:
            assert torch.equal(value, b[key]), key
    return worst


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())


class StopAt(Callback):
    """Stop the run after training step ``global_step``, as a stop signal would (``last.pt``, then exit 130)."""

    def __init__(self, global_step: int):
        self.global_step = global_step

    def on_step_end(self, trainer) -> None:
        if trainer.state.global_step == self.global_step:
            trainer.request_stop()


class _RecordEpochCheckpoints(Callback):
    """Record last.pt's sha256 after each epoch in ``saved`` (keyed by the 0-based epoch), then call
    ``then(trainer)``. Attach it with ``repopt.engine.callbacks.active``."""

    def __init__(self, then=None):
        self.saved: dict[int, str] = {}
        self.then = then

    def on_epoch_end(self, trainer, row: dict) -> None:
        self.saved[row["epoch"] - 1] = _sha256(trainer.last_path)
        if self.then is not None:
            self.then(trainer)


def train_tiny_target(root: Path, name: str, extra: list[str]) -> Path:
    """A finished one-epoch stage-two run of the tiny model in ``root/name`` (best.pt written)."""
    from target_train.app import main as target_main

    run_dir = root / name
    run_hydra(target_main, TINY + ["epochs=1", f"hydra.run.dir={run_dir}"] + list(extra))
    assert (run_dir / "best.pt").is_file()
    return run_dir
