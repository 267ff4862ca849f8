"""Fault injection: signals, non-finite losses, damaged and hostile files, crashes mid-write,
pre-flight errors, failed and concurrent sweep jobs. ``docs/reliability.md`` summarizes what each
test shows.

Everything runs on the synthetic data set with the tiny model on the CPU. The few tests that need a
real process (a signal from outside, the joblib launcher) start ``python -m hypersearch``; the rest
call the Hydra apps in this process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import repopt
import repopt.io
import repopt.scales
from hypersearch.app import main as hs_main
from pipelines.compare import main as compare_main
from pipelines.search_and_train import main as pipeline_main
from repopt import get_arch, load_scales, save_scales
from repopt.engine import load_checkpoint, save_checkpoint
from repopt.engine.trainer import Trainer
from repopt.errors import CheckpointError, RepOptError, ScalesError
from repopt.io import write_json
from tests.conftest import REPO, TINY, pipeline_overrides, read_json, run_hydra

OFFICIAL = ("B1", "B2", "L1", "L2")
TIMING_COLUMNS = ["epoch_seconds", "images_per_sec"]
TINY_STEPS = 128 // 32  # steps per epoch under TINY

# A run long enough to be caught mid-epoch by a signal from outside: 16 steps (about a second) per epoch.
SIGNAL_RUN = ["arch=tiny", "arch.strides=[1,2,2,2,1]", "data=synthetic", "data.image_size=16", "data.batch_size=16",
              "data.synthetic_train_size=256", "data.synthetic_test_size=32", "epochs=3", "sched.warmup_epochs=0.5",
              "progress=off", "device=cpu"]
SIGNAL_STEPS = 256 // 16

HYPOTHESIS = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}


# ------------------------------------------------------------------ helpers


def _env(threads: int = 1) -> dict:
    """The environment of a child run: unbuffered output and a fixed thread count (the same numerics in
    every child, and two children fit the two cores of a small machine)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _wait_until(condition, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def _history(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "history.csv").drop(columns=TIMING_COLUMNS)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _record_epoch_checkpoints(patch, then=None) -> dict:
    """Patch Trainer._end_epoch to record last.pt's sha256 after each epoch (then call ``then(trainer)``)."""
    saved = {}
    original_end = Trainer._end_epoch

    def end_epoch(self, epoch):
        row = original_end(self, epoch)
        saved[epoch] = _sha256(self.last_path)
        if then is not None:
            then(self)
        return row

    patch.setattr(Trainer, "_end_epoch", end_epoch)
    return saved


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())


def _assert_valid_scales(scales: dict, arch_name: str) -> None:
    """What ``load_scales`` promises for a file it accepts: the arch's keys and shapes, float32, finite."""
    shapes = get_arch(arch_name).scale_shapes()
    assert list(scales) == list(shapes)
    for key, shape in shapes.items():
        value = scales[key]
        assert tuple(value.shape) == shape and value.dtype == torch.float32, key
        assert bool(torch.isfinite(value).all()), key


def _model_layout(state: dict) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in state["model"].items()}


def _zip_payload_ranges(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the tensor storages (``<archive>/data/<n>`` records) inside a torch zip file."""
    ranges = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if "/data/" not in info.filename:
                continue
            offset = info.header_offset
            name_len, extra_len = struct.unpack("<HH", data[offset + 26:offset + 30])
            start = offset + 30 + name_len + extra_len
            ranges.append((start, start + info.file_size))
    return ranges


def _safetensors_payload_range(data: bytes) -> tuple[int, int]:
    header_len = int.from_bytes(data[:8], "little")
    return 8 + header_len, len(data)


def _in_ranges(offsets, ranges) -> bool:
    return all(any(lo <= off < hi for lo, hi in ranges) for off in offsets)


def _flip(data: bytes, flips) -> bytes:
    out = bytearray(data)
    for offset, bit in flips:
        out[offset % len(out)] ^= 1 << bit
    return bytes(out)


class _Captured(RepOptError):
    """Raised by a patched ``Trainer.fit`` once the app has assembled its trainer."""


# ------------------------------------------------------------------ shared artifacts (once per module)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A finished 1-epoch tiny run (its last.pt, scales, metrics) and tiny scales files in two formats."""
    root = tmp_path_factory.mktemp("artifacts")
    run_dir = root / "run"
    run_hydra(hs_main, TINY + ["epochs=1", f"hydra.run.dir={run_dir}"])
    arch = get_arch("tiny")
    scales_st = save_scales(root / "tiny.safetensors", arch.init_scales(), metadata={"note": "test"})
    scales_pth = root / "tiny.pth"  # the official release format: torch.save of a dict of tensors
    torch.save(arch.init_scales(), scales_pth)
    return {
        "root": root, "run_dir": run_dir, "checkpoint": run_dir / "last.pt", "scales_safetensors": scales_st,
        "scales_pth": scales_pth,
    }


@pytest.fixture(scope="module")
def captured_trainer(tmp_path_factory):
    """The trainer ``python -m hypersearch`` assembles for TINY (built by the app itself, not trained)."""
    run_dir = tmp_path_factory.mktemp("captured")
    box = []

    def fit(self):
        box.append(self)
        raise _Captured("trainer captured")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "fit", fit)
        run_hydra(hs_main, TINY + ["epochs=1", f"hydra.run.dir={run_dir}"], expect_exit=1)
    return box[0]


@pytest.fixture
def keep_rng():
    """``Trainer.restore`` sets the global torch RNG; give the next test the state it would have had."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


# ================================================================== 1. signals


@contextlib.contextmanager
def _process(command: list[str], log_path: Path, env: dict):
    """A child process with its output in ``log_path``; killed on the way out if still running."""
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(command, cwd=log_path.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path):
    """A real ``python -m hypersearch`` process gets SIGTERM as soon as epoch 1 has written ``last.pt``,
    i.e. early in epoch 2 of 3 (epoch 3 is a margin for a slow machine).

    It finishes the current step, writes ``last.pt`` and ``metrics.json`` (status interrupted) and exits
    with 130; ``last.pt`` holds a position inside epoch 2. The same command with ``resume=true`` then
    finishes, and its metrics, history and scales equal those of an uninterrupted run of the same
    command bit for bit. All three processes use one thread (same numerics); the uninterrupted
    reference runs beside the interrupted one.
    """
    env = _env()
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    command = [sys.executable, "-m", "hypersearch", *SIGNAL_RUN]
    with _process(command + [f"hydra.run.dir={reference}"], tmp_path / "reference.out", env) as ref_proc:
        with _process(command + [f"hydra.run.dir={run_dir}"], tmp_path / "interrupted.out", env) as proc:
            # last.pt appears after epoch 1: the process is training and its signal handler is installed
            _wait_until(lambda: (run_dir / "last.pt").exists() or proc.poll() is not None, timeout=240)
            assert proc.poll() is None, "the run ended before epoch 1 finished:\n" + (tmp_path / "interrupted.out").read_text()
            proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(timeout=240)
        assert returncode == 130, (tmp_path / "interrupted.out").read_text()
        assert "received SIGTERM" in (run_dir / "app.log").read_text()
        metrics = read_json(run_dir / "metrics.json")
        assert metrics["status"] == "interrupted", metrics
        state = load_checkpoint(run_dir / "last.pt")
        run = state["run"]
        assert run["epoch"] in (1, 2) and 0 < run["step_in_epoch"] < SIGNAL_STEPS, run  # mid-epoch, not a boundary
        assert run["global_step"] == run["epoch"] * SIGNAL_STEPS + run["step_in_epoch"] == metrics["steps"]
        assert _all_finite(state["model"].values())
        assert not (run_dir / "scales.safetensors").exists()  # stage one exports only when training ends

        resumed = subprocess.run(command + [f"hydra.run.dir={run_dir}", "resume=true"], check=False, cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"at epoch {run['epoch']}, step {run['step_in_epoch']}" in (run_dir / "app.log").read_text()  # "resumed from"
        assert ref_proc.wait(timeout=300) == 0, (tmp_path / "reference.out").read_text()

    done, full = read_json(run_dir / "metrics.json"), read_json(reference / "metrics.json")
    assert done["status"] == full["status"] == "completed"
    for key in ("top1", "top5", "loss", "best_top1", "epochs", "steps"):
        assert done[key] == full[key], (key, done[key], full[key])
    pd.testing.assert_frame_equal(_history(run_dir), _history(reference))
    a, b = load_scales(run_dir, get_arch("tiny")), load_scales(reference, get_arch("tiny"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _send_at(monkeypatch, global_step: int, *signals: int) -> None:
    """Deliver real signals to this process right after training step ``global_step``."""
    original = Trainer._check_finite

    def check(self, losses, first_step):
        original(self, losses, first_step)
        if self.state.global_step == global_step:
            for sig in signals:
                os.kill(os.getpid(), sig)  # CPython runs the Python-level handler before os.kill returns

    monkeypatch.setattr(Trainer, "_check_finite", check)


def test_sigint_mid_epoch_writes_checkpoint_and_exits_130(in_tmp, monkeypatch):
    """One SIGINT (Ctrl-C) one step into epoch 2: same as SIGTERM, checkpoint at the step boundary, exit 130."""
    run_dir = in_tmp / "run"
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        _send_at(m, TINY_STEPS + 1, signal.SIGINT)
        run_hydra(hs_main, TINY + [f"hydra.run.dir={run_dir}"], expect_exit=130)
    assert read_json(run_dir / "metrics.json")["status"] == "interrupted"
    run = load_checkpoint(run_dir / "last.pt")["run"]
    assert (run["epoch"], run["step_in_epoch"], run["global_step"]) == (1, 1, TINY_STEPS + 1)
    assert "received SIGINT" in (run_dir / "app.log").read_text()
    assert signal.getsignal(signal.SIGINT) is handler  # the previous handler was put back


def test_second_sigint_aborts_at_once_and_keeps_the_epoch_checkpoint(in_tmp, monkeypatch):
    """A second SIGINT aborts without waiting for the step boundary: exit 130, status interrupted,
    ``last.pt`` is the one written at the end of epoch 1 (untouched), and ``resume=true`` continues from it."""
    run_dir = in_tmp / "run"
    with monkeypatch.context() as m:
        saved = _record_epoch_checkpoints(m)
        _send_at(m, TINY_STEPS + 1, signal.SIGINT, signal.SIGINT)
        run_hydra(hs_main, TINY + [f"hydra.run.dir={run_dir}"], expect_exit=130)
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "interrupted" and "interrupted" in metrics["error"]
    assert list(saved) == [0] and _sha256(run_dir / "last.pt") == saved[0]
    run = load_checkpoint(run_dir / "last.pt")["run"]
    assert (run["epoch"], run["step_in_epoch"]) == (1, 0)
    assert not list(run_dir.glob(".*.tmp"))
    run_hydra(hs_main, TINY + ["resume=true", f"hydra.run.dir={run_dir}"])
    done = read_json(run_dir / "metrics.json")
    assert done["status"] == "completed" and done["epochs"] == 2 and done["steps"] == 2 * TINY_STEPS


# ================================================================== 2. damaged files (property-based)


def _scales_outcome(path: Path, arch_name: str) -> str:
    """``load_scales`` either raises ScalesError or returns scales that pass validation; nothing else."""
    try:
        scales = load_scales(path, arch_name)
    except ScalesError:
        return "refused"
    _assert_valid_scales(scales, arch_name)
    return "loaded"


def _checkpoint_outcome(path: Path) -> dict | None:
    """``load_checkpoint`` either raises CheckpointError or returns a dict with 'model' and 'run'."""
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return None
    assert isinstance(state, dict) and isinstance(state["model"], dict) and "run" in state
    return state


SCALES_SOURCES = ("scales_safetensors", "scales_pth")
flips_strategy = st.lists(st.tuples(st.integers(min_value=0, max_value=2**31), st.integers(0, 7)), min_size=1, max_size=8)
SAFETENSORS_PREFIX = (64).to_bytes(8, "little") + b"{"  # a header length, then the start of the JSON header


@settings(max_examples=40, **HYPOTHESIS)
@given(source=st.sampled_from(SCALES_SOURCES), fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_scales_file_is_a_scales_error(artifacts, source, fraction):
    """A scales file (safetensors or official-style .pth) cut at any length: ScalesError, never another type."""
    data = artifacts[source].read_bytes()
    path = artifacts["root"] / "case_truncated"
    path.write_bytes(data[:int(fraction * len(data))])
    assert _scales_outcome(path, "tiny") == "refused"


@settings(max_examples=60, **HYPOTHESIS)
@given(source=st.sampled_from(SCALES_SOURCES), flips=flips_strategy)
def test_bit_flipped_scales_file_is_refused_or_still_valid(artifacts, source, flips):
    """1-8 random bit flips in a scales file: ScalesError, or (flips in tensor bytes that keep the file
    structurally valid) scales with the arch's keys and shapes, float32, all finite. Never another
    exception type, and flips confined to the tensor payload never break the structure."""
    data = artifacts[source].read_bytes()
    damaged = _flip(data, flips)
    path = artifacts["root"] / "case_flipped"
    path.write_bytes(damaged)
    outcome = _scales_outcome(path, "tiny")
    payload = [_safetensors_payload_range(data)] if source == "scales_safetensors" else _zip_payload_ranges(data)
    if _in_ranges([off % len(data) for off, _ in flips], payload):
        # structure untouched: loaded exactly when every (float32) payload value is still finite
        finite = all(bool(torch.isfinite(torch.frombuffer(bytearray(damaged[lo:hi]), dtype=torch.float32)).all())
                     for lo, hi in payload)
        assert outcome == ("loaded" if finite else "refused")


@settings(max_examples=60, **HYPOTHESIS)
@given(prefix=st.sampled_from([b"", b"PK\x03\x04", SAFETENSORS_PREFIX]), body=st.binary(max_size=600))
def test_random_bytes_as_scales_file_is_a_scales_error(artifacts, prefix, body):
    """Random bytes, bare or behind a zip or safetensors-like prefix: ScalesError. (Bytes that start like
    a pickle, 0x80, take torch's legacy reader: see the strict xfail below.)"""
    assume(not (prefix + body).startswith(b"\x80"))
    path = artifacts["root"] / "case_random_scales"
    path.write_bytes(prefix + body)
    assert _scales_outcome(path, "tiny") == "refused"


@settings(max_examples=60, **HYPOTHESIS)
@example(prefix=b"\x80\x02", body=b"J")
@given(prefix=st.sampled_from([b"\x80\x02", b"\x80\x04"]), body=st.binary(max_size=600))
def test_random_pickle_like_bytes_as_scales_file_are_a_scales_error(artifacts, prefix, body):
    """Random bytes behind a pickle header (0x80 0x02 / 0x80 0x04): ScalesError."""
    path = artifacts["root"] / "case_random_scales"
    path.write_bytes(prefix + body)
    assert _scales_outcome(path, "tiny") == "refused"


@settings(max_examples=30, **HYPOTHESIS)
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_checkpoint_is_a_checkpoint_error(artifacts, fraction):
    """``last.pt`` cut at any length: CheckpointError, never another exception type."""
    data = artifacts["checkpoint"].read_bytes()
    path = artifacts["root"] / "case_truncated.pt"
    path.write_bytes(data[:int(fraction * len(data))])
    assert _checkpoint_outcome(path) is None


@settings(max_examples=60, **HYPOTHESIS)
@given(flips=flips_strategy)
def test_bit_flipped_checkpoint_is_refused_or_structurally_valid(artifacts, flips):
    """1-8 random bit flips in ``last.pt``: CheckpointError, or (a flip in bytes nothing reads) the
    original layout. A flip in tensor payload bytes is always refused: the zip CRCs are verified."""
    data = artifacts["checkpoint"].read_bytes()
    flipped = _flip(data, flips)
    assume(flipped != data)  # the same bit flipped twice
    path = artifacts["root"] / "case_flipped.pt"
    path.write_bytes(flipped)
    state = _checkpoint_outcome(path)
    if _in_ranges([off % len(data) for off, _ in flips], _zip_payload_ranges(data)):
        assert state is None
    elif state is not None:
        assert _model_layout(state) == _model_layout(load_checkpoint(artifacts["checkpoint"]))


@settings(max_examples=60, **HYPOTHESIS)
@given(body=st.binary(max_size=600))
def test_random_bytes_behind_a_zip_header_as_checkpoint_are_a_checkpoint_error(artifacts, body):
    """Random bytes behind a zip header (the format torch writes) as ``last.pt``: CheckpointError."""
    path = artifacts["root"] / "case_random.pt"
    path.write_bytes(b"PK\x03\x04" + body)
    assert _checkpoint_outcome(path) is None


@settings(max_examples=60, **HYPOTHESIS)
@example(prefix=b"", body=b"J")
@given(prefix=st.sampled_from([b"", b"\x80\x02", b"\x80\x04", SAFETENSORS_PREFIX]), body=st.binary(max_size=600))
def test_random_bytes_as_checkpoint_are_a_checkpoint_error(artifacts, prefix, body):
    """Random bytes, bare or behind a pickle or safetensors-like prefix, as ``last.pt``: CheckpointError."""
    path = artifacts["root"] / "case_random.pt"
    path.write_bytes(prefix + body)
    assert _checkpoint_outcome(path) is None


WRONG_ARCH = [(f"official:{name}", arch) for name in OFFICIAL for arch in ("tiny", "small", "A0s", *OFFICIAL) if arch != name]


@pytest.mark.parametrize("source,arch", WRONG_ARCH)
def test_official_scales_of_another_architecture_are_refused(source, arch):
    """Each released file (B1, B2, L1, L2) against every other architecture: ScalesError naming the arch."""
    with pytest.raises(ScalesError, match=f"arch {arch}"):
        load_scales(source, arch)


@pytest.mark.parametrize("source", SCALES_SOURCES)
@pytest.mark.parametrize("arch", ["B1", "L2", "small"])
def test_tiny_scales_against_a_bigger_architecture_are_refused(artifacts, source, arch):
    with pytest.raises(ScalesError, match=f"arch {arch}"):
        load_scales(artifacts[source], arch)


def test_matching_files_load(artifacts):
    """The positive control for the tests above: every file loads against its own architecture."""
    for name in OFFICIAL:
        _assert_valid_scales(load_scales(f"official:{name}", name), name)
    for source in SCALES_SOURCES:
        _assert_valid_scales(load_scales(artifacts[source], "tiny"), "tiny")
    assert _checkpoint_outcome(artifacts["checkpoint"]) is not None


def _first_float_one_payload(data: bytes) -> int:
    """Offset of the high byte of a float32 in [1, 2) inside a tensor storage: flipping its bit 6 makes
    the exponent all ones (inf or NaN)."""
    for lo, hi in _zip_payload_ranges(data):
        for off in range(lo, hi - 3, 4):
            value = struct.unpack("<f", data[off:off + 4])[0]
            if 1.0 <= abs(value) < 2.0:
                return off + 3
    raise AssertionError("no float in [1, 2) in the checkpoint")


def test_bit_flip_to_non_finite_checkpoint_value_is_refused(artifacts, tmp_path):
    data = artifacts["checkpoint"].read_bytes()
    offset = _first_float_one_payload(data)
    path = tmp_path / "last.pt"
    path.write_bytes(_flip(data, [(offset, 6)]))
    assert zipfile.ZipFile(path).testzip() is not None  # the archive's own CRC32 sees the damage
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return
    assert _all_finite(state["model"].values()), "loaded with non-finite model weights"
    pytest.fail("a damaged checkpoint loaded without error")


def _flip_key_byte(data: bytes, key: bytes) -> bytes:
    """Flip the lowest bit of the first character of ``key`` where it is stored in the pickle."""
    offset = data.index(key)
    return _flip(data, [(offset, 0)])


def test_resume_from_checkpoint_with_damaged_run_state_is_a_checkpoint_error(artifacts, captured_trainer, keep_rng, tmp_path):
    """One bit flip in the name of a run-state field (``step_in_epoch`` -> ``rtep_in_epoch``) fails the
    archive's CRC check; the same damage written as a valid archive fails when the run state is rebuilt.
    Either way resuming is a CheckpointError."""
    path = tmp_path / "last.pt"
    path.write_bytes(_flip_key_byte(artifacts["checkpoint"].read_bytes(), b"step_in_epoch"))
    with pytest.raises(CheckpointError, match="CRC"):
        captured_trainer.restore(path)
    state = load_checkpoint(artifacts["checkpoint"])
    state["run"]["rtep_in_epoch"] = state["run"].pop("step_in_epoch")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="does not fit"):
        captured_trainer.restore(path)


def test_resume_from_checkpoint_of_the_intact_file_works(artifacts, captured_trainer, keep_rng):
    """The positive control of the test above: the same trainer restores the undamaged file."""
    assert captured_trainer.restore(artifacts["checkpoint"]) is True
    assert captured_trainer.state.epoch == 1 and captured_trainer.state.global_step == TINY_STEPS


def _legacy_pickle(obj, path: Path) -> bytes:
    torch.save(obj, path, _use_new_zipfile_serialization=False)  # torch's pre-1.6 format, still accepted on load
    return path.read_bytes()


def test_truncated_legacy_pth_scales_file_is_a_scales_error(tmp_path):
    data = _legacy_pickle(get_arch("tiny").init_scales(), tmp_path / "full.pth")
    path = tmp_path / "scales.pth"
    path.write_bytes(data[:data.index(b"X\x10\x00\x00\x00protocol_version") + 1])  # cut inside a string length
    with pytest.raises(ScalesError):
        load_scales(path, "tiny")


def test_bit_flipped_legacy_pth_scales_file_is_a_scales_error(tmp_path):
    data = _legacy_pickle(get_arch("tiny").init_scales(), tmp_path / "full.pth")
    keys = [m for m in re.finditer(rb"X([\x01-\x40])\x00\x00\x00", data) if data[m.end():m.end() + m.group(1)[0]].isdigit()]
    path = tmp_path / "scales.pth"
    path.write_bytes(_flip(data, [(keys[-1].end(), 0)]))  # a digit stays a digit: '9' <-> '8'
    with pytest.raises(ScalesError):
        load_scales(path, "tiny")


def test_truncated_legacy_checkpoint_is_a_checkpoint_error(artifacts, tmp_path):
    data = _legacy_pickle(load_checkpoint(artifacts["checkpoint"]), tmp_path / "full.pt")
    path = tmp_path / "last.pt"
    path.write_bytes(data[:data.index(b"X\x10\x00\x00\x00protocol_version") + 1])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


# ================================================================== 3. hostile pickles


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


# ================================================================== 4. non-finite loss


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


def test_divergence_in_epoch_2_keeps_the_epoch_1_checkpoint(in_tmp, monkeypatch):
    """Epoch 1 trains normally; from epoch 2 on the learning rate is 1e30 (set as the schedule's base lr,
    as ``optim.lr=1e30`` would; 1e9 this late in the cosine schedule only gives huge, finite losses).
    Exit 1, status diverged at a step of epoch 2, and last.pt is still the epoch-1 checkpoint, byte for byte, with finite weights; ``resume=true`` (sane lr) continues from it."""
    run_dir = in_tmp / "run"
    def explode_lr(trainer):
        trainer.scheduler.base_lrs = [1e30 for _ in trainer.scheduler.base_lrs]
        for group in trainer.optimizer.param_groups:
            group["lr"] = 1e30

    with monkeypatch.context() as m:
        saved = _record_epoch_checkpoints(m, then=explode_lr)
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
    run_hydra(pipeline_main, ["-m"] + pipeline_overrides() + ["hs.optim.lr=1e30,0.05", f"hydra.sweep.dir={sweep}"])
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


# ================================================================== 5. concurrent jobs


def test_joblib_sweep_of_four_seeds_gives_four_complete_distinct_jobs(tmp_path):
    """``python -m hypersearch -m hydra/launcher=joblib hydra.launcher.n_jobs=2 seed=0,1,2,3``: four job
    directories 0..3, each complete (status completed, scales, history, last.pt), each with its own
    overrides naming its seed and a checkpoint of that seed; the four scales files differ pairwise."""
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "hypersearch", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1,2,3",
               *TINY, "epochs=1", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(command, check=False, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Joblib.Parallel(n_jobs=2" in output, output
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: p.name)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    digests = []
    for seed, job in enumerate(jobs):
        for name in ("metrics.json", "scales.safetensors", "history.csv", "last.pt", "app.log", ".hydra/overrides.yaml"):
            assert (job / name).is_file(), (job, name)
        assert read_json(job / "metrics.json")["status"] == "completed"
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        assert f"seed={seed}" in overrides and all(f"seed={s}" not in overrides for s in range(4) if s != seed)
        assert load_checkpoint(job / "last.pt")["config"]["seed"] == seed
        assert len(pd.read_csv(job / "history.csv")) == 1
        assert not list(job.glob(".*.tmp"))
        digests.append(_sha256(job / "scales.safetensors"))
    assert len(set(digests)) == 4, digests


# ================================================================== 6. crash during a write


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
        monkeypatch.setattr(repopt.io.torch, "save", lambda obj, f, *a, **k: partial(f))
    elif name == "scales.safetensors":
        monkeypatch.setattr(repopt.scales, "save_file", lambda tensors, f, *a, **k: partial(f))
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
    sources = {"last.pt": artifacts["checkpoint"], "scales.safetensors": artifacts["scales_safetensors"],
               "metrics.json": artifacts["run_dir"] / "metrics.json"}
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


# ================================================================== 7. pre-flight errors and resume mismatches


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_fails_before_training(in_tmp, capsys):
    run_dir = in_tmp / "run"
    run_hydra(hs_main, TINY + ["device=cuda", f"hydra.run.dir={run_dir}"], expect_exit=1)
    err = capsys.readouterr().err
    assert "device=cuda" in err and "no usable CUDA GPU" in err and "Traceback" not in err
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "failed" and "CUDA" in metrics["error"]
    assert not (run_dir / "last.pt").exists()


def test_run_dir_below_a_regular_file_fails_before_training(in_tmp, capsys):
    """``run_dir=<file>/run`` (the app's own run directory): exit 1 with the project's one-line message."""
    blocker = in_tmp / "blocker"
    blocker.write_text("a regular file")
    run_hydra(hs_main, TINY + [f"hydra.run.dir={in_tmp / 'hydra'}", f"run_dir={blocker / 'run'}"], expect_exit=1)
    err = capsys.readouterr().err
    assert f"run directory {blocker / 'run'} is not writable" in err and "Traceback" not in err
    assert blocker.read_text() == "a regular file"
    assert not list((in_tmp / "hydra").glob("last.pt"))


def test_hydra_run_dir_below_a_regular_file_fails_before_training(in_tmp, capsys):
    """``hydra.run.dir=<file>/run``: Hydra itself fails to create the directory before the app starts
    (so the message is Hydra's, not the project's): exit 1, naming the path."""
    blocker = in_tmp / "blocker"
    blocker.write_text("a regular file")
    run_hydra(hs_main, TINY + [f"hydra.run.dir={blocker / 'run'}"], expect_exit=1)
    err = capsys.readouterr().err
    assert "Not a directory" in err and str(blocker / "run") in err
    assert blocker.read_text() == "a regular file"


def test_missing_image_folder_fails_before_training(in_tmp, capsys):
    run_dir = in_tmp / "run"
    missing = in_tmp / "no-such-data"
    overrides = [o for o in TINY if not o.startswith("data")] + ["data=imagefolder", f"data.root={missing}"]
    run_hydra(hs_main, overrides + [f"hydra.run.dir={run_dir}"], expect_exit=1)
    err = capsys.readouterr().err
    assert f"data.root {missing} does not exist" in err and "Traceback" not in err
    assert read_json(run_dir / "metrics.json")["status"] == "failed"
    assert not (run_dir / "last.pt").exists()


def test_resume_with_another_class_count_is_refused_and_keeps_the_checkpoint(artifacts, in_tmp, capsys):
    """``resume=true`` with ``data.synthetic_num_classes=5`` on a 10-class run: exit 1, the message names
    num_classes, last.pt and metrics.json are unchanged."""
    run_dir = in_tmp / "run"
    shutil.copytree(artifacts["run_dir"], run_dir)
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "metrics.json", "history.csv")}
    run_hydra(hs_main, TINY + ["epochs=2", "resume=true", "data.synthetic_num_classes=5", f"hydra.run.dir={run_dir}"],
              expect_exit=1)
    err = capsys.readouterr().err
    assert "num_classes" in err and "(10)" in err and "(5)" in err and "Traceback" not in err
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_resume_with_more_epochs_is_refused_or_honoured(artifacts, in_tmp):
    """Resuming a finished 1-epoch run with ``epochs=2``: either refused (exit 1) or the second epoch
    really trains (lr > 0). Silently training it at lr 0 is neither."""
    run_dir = in_tmp / "run"
    shutil.copytree(artifacts["run_dir"], run_dir)
    try:
        run_hydra(hs_main, TINY + ["epochs=2", "resume=true", f"hydra.run.dir={run_dir}"])
    except SystemExit as exc:
        assert exc.code == 1
        return
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 2 and history.loc[1, "lr"] > 0, history
