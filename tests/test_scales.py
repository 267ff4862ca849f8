"""The scales file contract: save/load, accepted sources, strict validation, safe loading."""

from __future__ import annotations

import builtins
import hashlib
import io
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

import repopt
from repopt import load_scales, read_metadata, resolve_scales_path, save_scales
from repopt.errors import ScalesError
from repopt.scales import SCALES_FILENAME, random_scales, read_scales
from repopt.vgg import RepOptVGG
from repopt.vgg.arch import get_arch

OFFICIAL_DIR = Path(repopt.__file__).parent / "official_scales"
SHARED_DIR = Path("/work/shared/official-scales")
OFFICIAL = ("B1", "B2", "L1", "L2")


pytestmark = pytest.mark.usefixtures("single_thread")


def assert_scales_error(excinfo, *needles):
    msg = str(excinfo.value)
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in error message: {msg}"


# ---------------------------------------------------------------- roundtrip and metadata


def test_save_load_roundtrip_with_metadata(tmp_path):
    scales = random_scales("tiny", seed=1)
    arch = get_arch("tiny")
    meta = {"arch": arch.to_dict(), "hs_accuracy": 0.6125, "dataset": "cifar100", "epochs": 3, "source_run": "outputs/run-a"}
    path = save_scales(tmp_path / SCALES_FILENAME, scales, meta).path
    assert path == tmp_path / SCALES_FILENAME
    loaded = load_scales(path, "tiny")
    assert list(loaded) == list(arch.scale_shapes())
    for k, v in scales.items():
        assert loaded[k].dtype == torch.float32
        assert torch.equal(loaded[k], v), k
    md = read_metadata(path)
    assert md["arch"] == arch.to_dict()
    assert md["hs_accuracy"] == 0.6125
    assert md["epochs"] == 3
    assert md["dataset"] == "cifar100"
    assert md["source_run"] == "outputs/run-a"
    assert md["format"] == "repopt-scales"
    assert "created" not in md  # no timestamp: the same scales and provenance give the same bytes
    # the arch in the metadata rebuilds the same spec
    assert repopt.ArchSpec.from_dict(md["arch"]) == arch
    # read through the directory form as well
    assert read_metadata(tmp_path)["epochs"] == 3


def test_metadata_string_values_keep_their_type(tmp_path):
    path = save_scales(tmp_path / SCALES_FILENAME, random_scales("tiny"), {"run_id": "42", "flag": "true"}).path
    md = read_metadata(path)
    assert md["format_version"] == "1"
    assert md["run_id"] == "42"
    assert md["flag"] == "true"


def test_save_converts_to_float32_and_load_returns_float32(tmp_path):
    scales = {k: v.double() * 3 for k, v in random_scales("tiny", 2).items()}
    path = save_scales(tmp_path / "s.safetensors", scales).path
    loaded = load_scales(path, "tiny")
    for k, v in scales.items():
        assert loaded[k].dtype == torch.float32
        assert torch.equal(loaded[k], v.float())


def test_read_metadata_of_official_file_is_empty():
    assert read_metadata("official:B1") == {}


def test_atomic_save_leaves_no_temp_files(tmp_path):
    folder = tmp_path / "run"
    save_scales(folder / SCALES_FILENAME, random_scales("tiny", 1))
    save_scales(folder / SCALES_FILENAME, random_scales("tiny", 2))  # overwrite
    assert sorted(p.name for p in folder.iterdir()) == [SCALES_FILENAME]
    loaded = load_scales(folder, "tiny")
    assert torch.equal(loaded["stage0.scale_conv.weight"], random_scales("tiny", 2)["stage0.scale_conv.weight"])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_umask_mode_of_a_plain_write(tmp_path, umask):
    """Artifacts are as readable as a file written with open(): not the owner-only mode of a temp file."""
    from repopt.io import write_text

    previous = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        write_text(tmp_path / "atomic.txt", "x")
        save_scales(tmp_path / SCALES_FILENAME, random_scales("tiny", 1))
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == expected
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == expected
    assert (tmp_path / SCALES_FILENAME).stat().st_mode & 0o777 == expected


def test_failed_save_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    old = random_scales("tiny", 1)
    save_scales(folder / SCALES_FILENAME, old)

    real_write = Path.write_bytes

    def broken_write(self, data):
        real_write(self, b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", broken_write)
    with pytest.raises(OSError):
        save_scales(folder / SCALES_FILENAME, random_scales("tiny", 2))
    assert sorted(p.name for p in folder.iterdir()) == [SCALES_FILENAME]
    monkeypatch.undo()
    loaded = load_scales(folder / SCALES_FILENAME, "tiny")
    assert all(torch.equal(loaded[k], old[k]) for k in old)


@pytest.mark.parametrize(
    "bad_key", ["linear.weight", "stage0.conv.weight", "module.stage0.scale_conv.weight", "stage5.0.scale_conv.weight"]
)
def test_save_non_scale_key_raises(tmp_path, bad_key):
    scales = random_scales("tiny")
    scales[bad_key] = torch.ones(8)
    with pytest.raises(ScalesError) as exc:
        save_scales(tmp_path / SCALES_FILENAME, scales)
    assert_scales_error(exc, bad_key)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- accepted sources


@pytest.mark.parametrize("name", OFFICIAL)
def test_load_official_shorthand(name):
    loaded = load_scales(f"official:{name}", name)
    raw = torch.load(OFFICIAL_DIR / f"RepOpt-VGG-{name}-scales.pth", weights_only=True)
    assert set(loaded) == set(raw)
    for k, v in raw.items():
        assert torch.equal(loaded[k], v.float()), k
    # the released scales do contain negative values (what makes |s| matter for AdamW)
    assert min(v.min().item() for v in loaded.values()) < 0
    assert resolve_scales_path(f"official:{name.lower()}") == OFFICIAL_DIR / f"RepOpt-VGG-{name}-scales.pth"


def test_unknown_official_name():
    with pytest.raises(ScalesError, match="B3"):
        load_scales("official:B3", "B1")


@pytest.mark.skipif(not SHARED_DIR.is_dir(), reason="shared official-scales folder absent")
@pytest.mark.parametrize("name", OFFICIAL)
def test_load_shared_official_files(name):
    path = SHARED_DIR / f"RepOpt-VGG-{name}-scales.pth"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    loaded = load_scales(path, name)
    raw = torch.load(path, weights_only=True)
    assert set(loaded) == set(get_arch(name).scale_shapes())
    assert all(torch.equal(loaded[k], raw[k].float()) for k in raw)


def _hs_state_dict(arch, seed):
    torch.manual_seed(seed)
    model = RepOptVGG(arch, 10, mode="hs")
    expected = random_scales(arch, seed + 100)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in expected.items():
            params[k].copy_(v)
    return model.state_dict(), expected


def test_official_hs_checkpoint_loads_only_scales(tmp_path):
    arch = get_arch("tiny", strides=(1, 1, 2, 2, 2))
    sd, expected = _hs_state_dict(arch, 3)
    assert any(k.endswith("conv.weight") for k in sd) and any("running_mean" in k for k in sd)
    ckpt = {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 120, "max_accuracy": 71.5}
    path = tmp_path / "hs_checkpoint.pth"
    torch.save(ckpt, path)
    loaded = load_scales(path, arch)
    assert set(loaded) == set(expected)
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k
    # without the DDP prefix as well
    torch.save({"model": sd}, path)
    loaded = load_scales(path, arch)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_hs_checkpoint_for_other_arch_is_rejected(tmp_path):
    sd, _ = _hs_state_dict(get_arch("tiny"), 0)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "small")
    # small has two blocks in stage 3, tiny one
    assert_scales_error(exc, path, "stage3.1.scale_conv.weight", "missing")


def test_run_directory_resolves_to_its_own_file_only(tmp_path):
    """A stage-one run directory means its scales file; the core knows no pipeline layout (a pipeline
    job hands stage two the exact file), so a job directory is a clear error naming <job>/hs."""
    s1, s2 = random_scales("tiny", 5), random_scales("tiny", 6)
    run = tmp_path / "run"
    save_scales(run / SCALES_FILENAME, s1)
    pipeline = tmp_path / "pipeline"
    save_scales(pipeline / "hs" / SCALES_FILENAME, s2)
    assert resolve_scales_path(run) == run / SCALES_FILENAME
    a = load_scales(run, "tiny")
    assert all(torch.equal(a[k], s1[k]) for k in s1)
    with pytest.raises(ScalesError, match="in a pipeline job that is <job>/hs"):
        load_scales(pipeline, "tiny")
    b = load_scales(pipeline / "hs", "tiny")
    assert all(torch.equal(b[k], s2[k]) for k in s2)


def test_save_and_read_return_one_object_of_the_bytes(tmp_path, monkeypatch):
    """save_scales returns what it wrote; read_scales reads the file once and returns the tensors,
    the sha256 of exactly those bytes and the metadata, from that one read."""
    written = save_scales(tmp_path / SCALES_FILENAME, random_scales("tiny", 3), {"run_id": 7})
    assert written.sha256 == hashlib.sha256(written.path.read_bytes()).hexdigest()
    assert written.metadata["run_id"] == 7 and written.metadata["format"] == "repopt-scales"
    opened = []
    real_open = io.open

    def counting_open(file, *args, **kwargs):
        opened.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting_open)
    for source in (written.path, "official:B1"):
        opened.clear()
        read = read_scales(source, "tiny" if source == written.path else "B1")
        assert len(opened) == 1, opened
        assert read.sha256 == hashlib.sha256(read.path.read_bytes()).hexdigest()
    monkeypatch.undo()
    read = read_scales(tmp_path, "tiny")
    assert read.sha256 == written.sha256 and read.metadata == written.metadata
    assert all(torch.equal(read.tensors[k], written.tensors[k]) for k in written.tensors)


def test_plain_pth_dict_with_module_prefix(tmp_path):
    s = random_scales("small", 7)
    path = tmp_path / "scales.pth"
    torch.save({f"module.{k}": v for k, v in s.items()}, path)
    loaded = load_scales(path, "small")
    assert all(torch.equal(loaded[k], s[k]) for k in s)


def test_legacy_torch_format(tmp_path):
    s = random_scales("tiny", 8)
    path = tmp_path / "legacy.pth"
    torch.save(s, path, _use_new_zipfile_serialization=False)
    loaded = load_scales(path, "tiny")
    assert all(torch.equal(loaded[k], s[k]) for k in s)
    marker = tmp_path / "pwned"
    evil = dict(s)
    evil["stage0.scale_conv.weight"] = _SystemPayload(marker)
    torch.save(evil, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "tiny")
    assert not marker.exists()
    assert_scales_error(exc, path)


def test_extracted_scales_of_hs_model_roundtrip(tmp_path):
    from hypersearch.model import build_hs_model, extract_scales

    arch = get_arch("tiny", strides=(1, 1, 2, 2, 2))
    model = build_hs_model(arch, 10)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".scale_" in n:
                p.mul_(-1.5)
    scales = extract_scales(model)
    path = save_scales(tmp_path / SCALES_FILENAME, scales, {"arch": arch.to_dict()}).path
    loaded = load_scales(path, arch)
    params = dict(model.named_parameters())
    assert all(torch.equal(loaded[k], params[k].detach()) for k in arch.scale_shapes())


# ---------------------------------------------------------------- errors


def test_wrong_architecture_official_b1_for_l1():
    path = resolve_scales_path("official:B1")
    with pytest.raises(ScalesError) as exc:
        load_scales("official:B1", "L1")
    # L1 has 8 blocks in stage 1: stage1.4 onwards is missing from the B1 file
    assert_scales_error(exc, path, "stage1.4.scale_conv.weight", "L1")


def test_wrong_architecture_shapes_b1_for_b2():
    path = resolve_scales_path("official:B1")
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "B2")
    assert_scales_error(exc, path, "stage1.0.scale_conv.weight", "(128,)", "(160,)")


def _save_raw(path, tensors):
    """Write a safetensors file without save_scales' key check."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_missing_key(tmp_path):
    s = random_scales("tiny")
    del s["stage2.1.scale_identity.weight"]
    path = save_scales(tmp_path / SCALES_FILENAME, s).path
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "tiny")
    assert_scales_error(exc, path, "stage2.1.scale_identity.weight", "missing")


def test_extra_key(tmp_path):
    s = random_scales("tiny")
    s["stage1.0.scale_identity.weight"] = torch.ones(8)  # stage1.0 has stride 2: no identity
    path = save_scales(tmp_path / SCALES_FILENAME, s).path
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "tiny")
    assert_scales_error(exc, path, "stage1.0.scale_identity.weight", "unexpected")
    # the same file fits the stride-1 variant exactly
    assert "stage1.0.scale_identity.weight" in load_scales(path, get_arch("tiny", strides=(1, 1, 2, 2, 2)))


def test_extra_non_scale_key_in_scales_file(tmp_path):
    s = random_scales("tiny")
    s["something_else"] = torch.ones(3)
    path = _save_raw(tmp_path / SCALES_FILENAME, s)
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "tiny")
    assert_scales_error(exc, path, "something_else")


def test_wrong_shape(tmp_path):
    s = random_scales("tiny")
    s["stage3.0.scale_1x1.weight"] = torch.ones(33)
    path = save_scales(tmp_path / SCALES_FILENAME, s).path
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "tiny")
    assert_scales_error(exc, path, "stage3.0.scale_1x1.weight", "(33,)", "(32,)")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite(tmp_path, bad):
    s = random_scales("tiny")
    s["stage4.0.scale_conv.weight"][5] = bad
    path = save_scales(tmp_path / SCALES_FILENAME, s).path
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "tiny")
    assert_scales_error(exc, path, "stage4.0.scale_conv.weight")


def test_integer_dtype_rejected(tmp_path):
    s = random_scales("tiny")
    s["stage0.scale_1x1.weight"] = torch.ones(8, dtype=torch.int64)
    path = tmp_path / "s.pth"
    torch.save(s, path)
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "tiny")
    assert_scales_error(exc, path, "stage0.scale_1x1.weight")


def test_non_tensor_entry(tmp_path):
    s = random_scales("tiny")
    s["stage0.scale_1x1.weight"] = [1.0] * 8
    path = tmp_path / "s.pth"
    torch.save(s, path)
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "tiny")
    assert_scales_error(exc, path, "stage0.scale_1x1.weight")


def test_non_dict_torch_file(tmp_path):
    path = tmp_path / "s.pth"
    torch.save([torch.ones(3)], path)
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "tiny")
    assert_scales_error(exc, path, "list")


def test_nonexistent_path(tmp_path):
    path = tmp_path / "nope" / SCALES_FILENAME
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "tiny")
    assert_scales_error(exc, path)


def test_directory_without_scales(tmp_path):
    (tmp_path / "hs").mkdir()
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(ScalesError) as exc:
        load_scales(tmp_path, "tiny")
    assert_scales_error(exc, tmp_path, SCALES_FILENAME)


@pytest.mark.parametrize("content", [b"this is not a tensor file\n" * 4, b"", b"PK\x03\x04garbage-zip", b"\x80\x02garbage"])
def test_not_a_tensor_file(tmp_path, content):
    path = tmp_path / "scales.bin"
    path.write_bytes(content)
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "tiny")
    assert_scales_error(exc, path)


@pytest.mark.parametrize("keep", [0.5, 0.95, 12 / 1000])
def test_truncated_safetensors(tmp_path, keep):
    good = save_scales(tmp_path / "good.safetensors", random_scales("small")).path
    data = good.read_bytes()
    path = tmp_path / SCALES_FILENAME
    path.write_bytes(data[: max(10, int(len(data) * keep))])
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "small")
    assert_scales_error(exc, path)


def test_truncated_torch_file(tmp_path):
    path = tmp_path / "s.pth"
    torch.save(random_scales("small"), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "small")
    assert_scales_error(exc, path)


class _SystemPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpenPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload_cls", [_SystemPayload, _OpenPayload])
@pytest.mark.parametrize("container", ["raw_pickle", "torch_save", "hs_checkpoint"])
def test_malicious_pickle_is_refused(tmp_path, payload_cls, container):
    marker = tmp_path / "pwned"
    payload = payload_cls(marker)
    scales = dict(random_scales("tiny"))
    path = tmp_path / "evil.pth"
    if container == "raw_pickle":
        scales["stage0.scale_conv.weight"] = payload
        path.write_bytes(pickle.dumps(scales, protocol=2))
        assert path.read_bytes()[:1] == b"\x80"
    elif container == "torch_save":
        scales["stage0.scale_conv.weight"] = payload
        torch.save(scales, path)
    else:
        torch.save({"model": scales, "config": payload}, path)
    assert not marker.exists()
    with pytest.raises(ScalesError) as exc:
        load_scales(path, "tiny")
    assert not marker.exists(), "loading the scales file ran code"
    assert_scales_error(exc, path)
    assert read_metadata(path) == {}  # not a safetensors file: the header is not read as pickle either
    assert not marker.exists()


def test_validate_scales_directly():
    arch = get_arch("tiny")
    good = random_scales("tiny")
    repopt.validate_scales(good, arch)
    bad = dict(good)
    bad.pop("stage0.scale_conv.weight")
    with pytest.raises(ScalesError, match="stage0.scale_conv.weight"):
        repopt.validate_scales(bad, arch, source="my-source")
    with pytest.raises(ScalesError, match="my-source"):
        repopt.validate_scales(bad, arch, source="my-source")
