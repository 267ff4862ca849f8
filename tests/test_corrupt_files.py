"""Damaged files: scales files and checkpoints cut short, bit-flipped or replaced by random bytes
(property-based, with hypothesis), scales of another architecture, damaged run state on resume, and
torch's legacy (pre-1.6) pickle format. ``docs/reliability.md`` summarizes what each test shows.

``load_scales`` must raise ScalesError and ``load_checkpoint`` CheckpointError, or return something
valid; never another exception type.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from hypersearch.app import main as hs_main
from repopt import get_arch, load_scales
from repopt.engine import load_checkpoint
from repopt.engine.callbacks import Callback, active
from repopt.errors import CheckpointError, RepOptError, ScalesError
from tests.helpers.runs import TINY, TINY_STEPS, _all_finite, run_hydra

OFFICIAL = ("B1", "B2", "L1", "L2")

HYPOTHESIS = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}


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
            name_len, extra_len = struct.unpack("<HH", data[offset + 26 : offset + 30])
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
    """Raised by ``_CaptureTrainer`` once the app has assembled its trainer (and run its first step)."""


class _CaptureTrainer(Callback):
    """Keep the trainer the app built in ``box`` and end the run at its first step."""

    def __init__(self):
        self.box = []

    def on_step_end(self, trainer) -> None:
        self.box.append(trainer)
        raise _Captured("trainer captured")


@pytest.fixture(scope="module")
def captured_trainer(tmp_path_factory):
    """The trainer ``python -m hypersearch`` assembles for TINY (built by the app itself, stopped after its
    first step; the tests restore a checkpoint into it)."""
    run_dir = tmp_path_factory.mktemp("captured")
    capture = _CaptureTrainer()
    with active(capture):
        run_hydra(hs_main, TINY + ["epochs=1", f"hydra.run.dir={run_dir}"], expect_exit=1)
    return capture.box[0]


@pytest.fixture
def keep_rng():
    """``Trainer.restore`` sets the global torch RNG; give the next test the state it would have had."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


# ------------------------------------------------------------------ truncated, bit-flipped, random bytes


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
    path.write_bytes(data[: int(fraction * len(data))])
    assert _scales_outcome(path, "tiny") == "refused"


@settings(max_examples=60, **HYPOTHESIS)
@given(source=st.sampled_from(SCALES_SOURCES), flips=flips_strategy)
def test_bit_flipped_scales_file_is_refused_or_still_valid(artifacts, source, flips):
    """1-8 random bit flips in a scales file: ScalesError, or (flips in a safetensors file's tensor bytes,
    which keep it structurally valid) scales with the arch's keys and shapes, float32, all finite. A torch
    zip file with a changed tensor record fails that record's CRC-32 and is refused. Never another
    exception type."""
    data = artifacts[source].read_bytes()
    damaged = _flip(data, flips)
    path = artifacts["root"] / "case_flipped"
    path.write_bytes(damaged)
    outcome = _scales_outcome(path, "tiny")
    payload = [_safetensors_payload_range(data)] if source == "scales_safetensors" else _zip_payload_ranges(data)
    if damaged == data:  # flips that cancel out
        assert outcome == "loaded"
    elif _in_ranges([off % len(data) for off, _ in flips], payload):
        if source == "scales_pth":  # a zip record's CRC-32 is checked when it is read: a changed record is refused
            assert outcome == "refused"
            return
        # structure untouched: loaded exactly when every (float32) payload value is still finite
        finite = all(
            bool(torch.isfinite(torch.frombuffer(bytearray(damaged[lo:hi]), dtype=torch.float32)).all()) for lo, hi in payload
        )
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
    path.write_bytes(data[: int(fraction * len(data))])
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


# ------------------------------------------------------------------ the wrong architecture


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


# ------------------------------------------------------------------ a non-finite weight; damaged run state on resume


def _first_float_one_payload(data: bytes) -> int:
    """Offset of the high byte of a float32 in [1, 2) inside a tensor storage: flipping its bit 6 makes
    the exponent all ones (inf or NaN)."""
    for lo, hi in _zip_payload_ranges(data):
        for off in range(lo, hi - 3, 4):
            value = struct.unpack("<f", data[off : off + 4])[0]
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


# ------------------------------------------------------------------ torch's legacy (pre-1.6) format


def _legacy_pickle(obj, path: Path) -> bytes:
    torch.save(obj, path, _use_new_zipfile_serialization=False)  # torch's pre-1.6 format, still accepted on load
    return path.read_bytes()


def test_truncated_legacy_pth_scales_file_is_a_scales_error(tmp_path):
    data = _legacy_pickle(get_arch("tiny").init_scales(), tmp_path / "full.pth")
    path = tmp_path / "scales.pth"
    path.write_bytes(data[: data.index(b"X\x10\x00\x00\x00protocol_version") + 1])  # cut inside a string length
    with pytest.raises(ScalesError):
        load_scales(path, "tiny")


def test_bit_flipped_legacy_pth_scales_file_is_a_scales_error(tmp_path):
    data = _legacy_pickle(get_arch("tiny").init_scales(), tmp_path / "full.pth")
    keys = [m for m in re.finditer(rb"X([\x01-\x40])\x00\x00\x00", data) if data[m.end() : m.end() + m.group(1)[0]].isdigit()]
    path = tmp_path / "scales.pth"
    path.write_bytes(_flip(data, [(keys[-1].end(), 0)]))  # a digit stays a digit: '9' <-> '8'
    with pytest.raises(ScalesError):
        load_scales(path, "tiny")


def test_truncated_legacy_checkpoint_is_a_checkpoint_error(artifacts, tmp_path):
    data = _legacy_pickle(load_checkpoint(artifacts["checkpoint"]), tmp_path / "full.pt")
    path = tmp_path / "last.pt"
    path.write_bytes(data[: data.index(b"X\x10\x00\x00\x00protocol_version") + 1])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
