"""Crashes during a write: an OSError or Ctrl-C while ``last.pt``, ``scales.safetensors`` or
``metrics.json`` is being overwritten (half-way through the temporary file, or just before the
rename) leaves the old file intact. ``docs/reliability.md`` summarizes what the test shows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import repopt.io
import repopt.scales
from repopt import get_arch, load_scales, save_scales
from repopt.engine import load_checkpoint, save_checkpoint
from repopt.io import write_json


def _write_checkpoint(path: Path) -> None:
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "run": {"epoch": 99}})


def _write_scales(path: Path) -> None:
    save_scales(path, {k: v * 2 for k, v in get_arch("tiny").init_scales().items()})


def _write_metrics(path: Path) -> None:
    write_json(path, {"status": "overwritten"})


WRITERS = {"last.pt": _write_checkpoint, "scales.safetensors": _write_scales, "metrics.json": _write_metrics}


def _crash_mid_write(monkeypatch, name: str, exc: type[BaseException]) -> None:
    """Make the writer of ``name`` put half a file into its temporary path, then fail."""

    def partial(target) -> None:
        Path(target).write_bytes(b"PK\x03\x04 half a file")
        raise exc("simulated crash mid-write")

    if name == "last.pt":
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: partial(f))  # repopt.io imports torch when it saves
    elif name == "scales.safetensors":
        real_bytes = Path.write_bytes

        def write_bytes(self, data):
            if self.name.startswith(".scales.safetensors."):
                real_bytes(self, data[: len(data) // 2])
                raise exc("simulated crash mid-write")
            return real_bytes(self, data)

        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    else:
        real = Path.write_text

        def write_text(self, text, *a, **k):
            if self.name.startswith(".metrics.json."):
                real(self, text[: len(text) // 2])
                raise exc("simulated crash mid-write")
            return real(self, text, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)


def _crash_at_rename(monkeypatch, name: str, exc: type[BaseException]) -> None:
    def replace(src, dst):
        raise exc("simulated crash before the rename")

    monkeypatch.setattr(repopt.io.os, "replace", replace)


def _load(path: Path):
    if path.name == "last.pt":
        return load_checkpoint(path)
    if path.name == "scales.safetensors":
        return load_scales(path, "tiny")
    return json.loads(path.read_text())


@pytest.mark.parametrize("exc", [OSError, KeyboardInterrupt])
@pytest.mark.parametrize("crash", [_crash_mid_write, _crash_at_rename], ids=["mid-write", "at-rename"])
@pytest.mark.parametrize("name", list(WRITERS))
def test_crash_while_overwriting_keeps_the_old_file(artifacts, tmp_path, monkeypatch, name, crash, exc):
    """A crash (an OSError, or Ctrl-C) while the checkpoint / scales / metrics writer overwrites an existing
    valid file, either half-way through writing or just before the rename: the exception propagates, the
    old file is byte-for-byte intact and still loads, and no temporary file is left behind."""
    sources = {
        "last.pt": artifacts["checkpoint"],
        "scales.safetensors": artifacts["scales_safetensors"],
        "metrics.json": artifacts["run_dir"] / "metrics.json",
    }
    path = tmp_path / name
    shutil.copyfile(sources[name], path)
    before, listing = path.read_bytes(), sorted(os.listdir(tmp_path))
    with monkeypatch.context() as m:
        crash(m, name, exc)
        with pytest.raises(exc, match="simulated crash"):
            WRITERS[name](path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == listing  # no .<name>.*.tmp left
    _load(path)
    WRITERS[name](path)  # and the next write (no crash) replaces it
    assert path.read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == listing
