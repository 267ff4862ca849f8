"""Shared fixtures: run the Hydra apps in-process (fast) with outputs under a temp directory."""

from __future__ import annotations

import shutil
import subprocess
import tarfile

import pytest
import torch

from tests.helpers.runs import CIFAR10_JPEG, REPO, SHARED, TINY, _env, run_hydra  # noqa: F401 (the fixtures below use them)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """A finished 1-epoch tiny run (its last.pt, scales, metrics) and tiny scales files in two formats.

    Built once per session and shared by the files that damage, overwrite or resume from them (they
    copy what they change, or write new files beside them)."""
    from hypersearch.app import main as hs_main
    from repopt import get_arch, save_scales

    root = tmp_path_factory.mktemp("artifacts")
    run_dir = root / "run"
    run_hydra(hs_main, TINY + ["epochs=1", f"hydra.run.dir={run_dir}"])
    arch = get_arch("tiny")
    scales_st = save_scales(root / "tiny.safetensors", arch.init_scales(), metadata={"note": "test"}).path
    scales_pth = root / "tiny.pth"  # the official release format: torch.save of a dict of tensors
    torch.save(arch.init_scales(), scales_pth)
    return {
        "root": root,
        "run_dir": run_dir,
        "checkpoint": run_dir / "last.pt",
        "scales_safetensors": scales_st,
        "scales_pth": scales_pth,
    }


@pytest.fixture(scope="session", autouse=True)
def _decoded_image_cache(tmp_path_factory):
    """The tests' decoded image folders are cached in a temp folder of the session (REPOPT_CACHE_DIR,
    which child processes inherit), not in the user's ~/.cache/repopt/decoded: their roots are temp
    folders, so such a cache would never be read again."""
    folder = tmp_path_factory.mktemp("decoded-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPOPT_CACHE_DIR", str(folder))
        yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread: tiny convs are dominated by thread start-up, and results are bitwise reproducible."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request):
    """One temp folder for a test module, the working directory while it runs (nothing of Hydra's
    may land in the repository)."""
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
        mp.chdir(d)
        yield d


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
