"""Shared fixtures: run the Hydra apps in-process (fast) with outputs under a temp directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR10_JPEG = SHARED / "data" / "cifar10-jpeg.tar.gz"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Small, fast settings every app test starts from.
TINY = ["arch=tiny", "arch.strides=[1,2,2,2,1]", "data=synthetic", "data.batch_size=32", "data.synthetic_train_size=128",
        "data.synthetic_test_size=64", "epochs=2", "sched.warmup_epochs=0.5", "progress=off", "device=cpu"]


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


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread: tiny convs are dominated by thread start-up, and results are bitwise reproducible."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run with the working directory in a temp folder (Hydra's outputs/ lands there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def cifar10_jpeg(tmp_path_factory):
    """The shared real CIFAR-10 (JPEG, ImageFolder layout) extracted once per session; skip if absent."""
    if not CIFAR10_JPEG.is_file():
        pytest.skip(f"{CIFAR10_JPEG} is not present")
    dest = tmp_path_factory.mktemp("cifar10-jpeg")
    if shutil.which("tar"):  # much faster than tarfile for 60,000 small files
        subprocess.run(["tar", "-xzf", str(CIFAR10_JPEG), "-C", str(dest)], check=True)
    else:
        with tarfile.open(CIFAR10_JPEG) as tar:
            tar.extractall(dest, filter="data")
    yield dest
    shutil.rmtree(dest, ignore_errors=True)  # 60,000 files: do not leave them to pytest's tmp rotation
