"""Hostile pickles: checkpoints and scales files whose unpickling would run code (``os.system``,
``open``) are refused without running it, directly and on ``resume=true``. ``docs/reliability.md``
summarizes what each test shows.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from hypersearch.app import main as hs_main
from repopt import get_arch, load_scales
from repopt.engine import load_checkpoint
from repopt.errors import CheckpointError, ScalesError
from tests.helpers.runs import TINY, read_json, run_hydra


class _TouchBySystem:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _TouchByOpen:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import builtins

        return builtins.open, (str(self.marker), "w")


def _hostile_files(tmp_path: Path, kind: str):
    """(marker, path, writer) triples: the payload as the whole object or nested inside a valid-looking
    checkpoint / scales dict, saved with ``torch.save`` and as a raw pickle."""
    out = []
    for maker in (_TouchBySystem, _TouchByOpen):
        for container in ("bare", "nested"):
            for writer in ("torch", "pickle"):
                marker = tmp_path / f"marker-{kind}-{maker.__name__}-{container}-{writer}"
                payload = maker(marker)
                if container == "nested" and kind == "checkpoint":
                    payload = {"model": {"w": torch.zeros(2)}, "run": {"epoch": payload}}
                elif container == "nested":
                    payload = {**get_arch("tiny").init_scales(), "stage0.scale_conv.weight": payload}
                path = tmp_path / f"{marker.name}.{'pt' if kind == 'checkpoint' else 'pth'}"
                if writer == "torch":
                    torch.save(payload, path)
                else:
                    with open(path, "wb") as f:
                        pickle.dump(payload, f, protocol=2)
                out.append((marker, path, writer))
    return out


def test_hostile_pickles_are_real(tmp_path):
    """The control: loaded the unsafe way, each of these files does create its marker file."""
    for kind in ("checkpoint", "scales"):
        for marker, path, writer in _hostile_files(tmp_path, kind):
            if writer == "pickle":
                with open(path, "rb") as f:
                    result = pickle.load(f)
            else:
                result = torch.load(path, weights_only=False)
            del result
            assert marker.exists(), path.name
            marker.unlink()


@pytest.mark.parametrize("kind", ["checkpoint", "scales"])
def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, kind):
    """A pickle whose ``__reduce__`` would run ``os.system`` or ``open`` (torch.save or raw pickle, bare or
    nested in a valid-looking dict): ``load_checkpoint`` raises CheckpointError, ``load_scales`` raises
    ScalesError, and the marker file is never created."""
    for marker, path, _ in _hostile_files(tmp_path, kind):
        target = path.with_name("last.pt") if kind == "checkpoint" else path
        if kind == "checkpoint":
            shutil.copyfile(path, target)
            with pytest.raises(CheckpointError, match="refused"):
                load_checkpoint(target)
        else:
            with pytest.raises(ScalesError, match="refused"):
                load_scales(target, "tiny")
        assert not marker.exists(), path.name


def test_hostile_checkpoint_in_a_run_directory_is_refused_on_resume(in_tmp, capsys):
    """The same through the app: ``resume=true`` on a run directory whose last.pt is hostile exits 1."""
    run_dir = in_tmp / "run"
    run_dir.mkdir()
    marker = in_tmp / "marker"
    torch.save({"model": {}, "run": _TouchBySystem(marker)}, run_dir / "last.pt")
    run_hydra(hs_main, TINY + ["epochs=1", "resume=true", f"hydra.run.dir={run_dir}"], expect_exit=1)
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()
    assert read_json(run_dir / "metrics.json")["status"] == "failed"
