"""``python -m target_train.export``: ONNX export, FP32 check, static INT8 PTQ and quant.json."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from repopt.config import DataConfig, to_typed  # noqa: E402
from repopt.data import build_data  # noqa: E402
from repopt.engine import load_checkpoint  # noqa: E402
from repopt.numerics import rel_diff  # noqa: E402
from repopt.vgg import RepOptVGG  # noqa: E402
from repopt.vgg.arch import ArchSpec  # noqa: E402
from target_train import exporter as export_mod  # noqa: E402
from target_train import finished_run, onnx_io  # noqa: E402
from target_train import quantize as quant_mod  # noqa: E402
from target_train.export import main as export_main  # noqa: E402
from target_train.families.vgg import fuse  # noqa: E402
from tests.helpers.runs import read_json, run_hydra, train_tiny_target  # noqa: E402

EXPORT_FAST = ["calibration_images=64", "latency_runs=3", "latency_warmup=1", "threads=1"]
QUANT_FIELDS = (
    "fp32_top1",
    "fp32_top5",
    "int8_top1",
    "int8_top5",
    "top1_drop",
    "calibration_images",
    "eval_images",
    "onnx_fp32_max_rel_diff",
    "latency_ms_per_image",
    "layers",
    "model",
    "arch",
    "opset",
    "quantization",
    "created",
)
LAYER_FIELDS = (
    "name",
    "out_channels",
    "in_channels",
    "weight_min",
    "weight_max",
    "weight_absmax",
    "weight_std",
    "absmax_over_std",
)


# ---------------------------------------------------------------------------- fixtures
def _export(run_dir: Path, extra: list[str] = ()) -> dict:
    run_hydra(export_main, [f"run={run_dir}"] + EXPORT_FAST + list(extra))
    return read_json(run_dir / "quant.json")


@pytest.fixture(scope="module")
def target_run(workdir) -> Path:
    run_dir = train_tiny_target(workdir, "target", ["scales=init"])
    _export(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def repvgg_run(workdir) -> Path:
    run_dir = train_tiny_target(workdir, "repvgg", ["scales=init", "model=repvgg"])
    _export(run_dir)
    return run_dir


def trained_model(run_dir: Path) -> tuple[torch.nn.Module, dict]:
    ckpt = load_checkpoint(run_dir / "best.pt")
    model = RepOptVGG(ArchSpec.from_dict(ckpt["arch"]), ckpt["num_classes"], mode=ckpt["mode"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def first_test_batch(ckpt: dict) -> torch.Tensor:
    data = build_data(to_typed(ckpt["config"]["data"], DataConfig), "cpu", seed=0)
    x, _ = next(iter(data.test.epoch(0)))
    return x


def ort_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # no spinning thread pool on a shared CPU
    sess = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def snapshot(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and "export_logs" not in p.parts
    }


# ---------------------------------------------------------------------------- the target run
def test_quant_json_has_every_field(target_run):
    r = read_json(target_run / "quant.json")
    for key in QUANT_FIELDS:
        assert key in r, key
    assert r["model"] == "target" and r["arch"]["name"] == "tiny"
    assert 0.0 <= r["int8_top1"] <= 100.0 and 0.0 <= r["fp32_top1"] <= 100.0
    assert 0.0 <= r["int8_top5"] <= 100.0 and r["int8_top5"] >= r["int8_top1"]
    assert r["top1_drop"] == pytest.approx(r["fp32_top1"] - r["int8_top1"])
    assert r["calibration_images"] == 64 and r["eval_images"] == 64  # the whole synthetic test split
    assert r["onnx_fp32_max_rel_diff"] <= 1e-4
    assert r["opset"] >= 17
    for precision in ("fp32", "int8"):
        for batch in ("batch1", "batch32"):
            assert r["latency_ms_per_image"][precision][batch] > 0
    q = r["quantization"]
    assert q["format"] == "QDQ" and q["weight_type"] == "QInt8" and q["per_channel"] is True
    convs = [layer for layer in r["layers"] if layer["kind"] == "conv3x3"]
    assert [layer["name"] for layer in convs] == [s.name for s in ArchSpec.from_dict(r["arch"]).blocks]
    for layer in convs:
        for key in LAYER_FIELDS:
            assert key in layer, key
        assert layer["weight_absmax"] == pytest.approx(max(-layer["weight_min"], layer["weight_max"]))
        assert layer["absmax_over_std"] == pytest.approx(layer["weight_absmax"] / layer["weight_std"])
    assert (target_run / "model.onnx").is_file() and (target_run / "model.int8.onnx").is_file()
    assert not list(target_run.glob(".export-*")), "the scratch folder must be gone"
    assert (target_run / "export_logs").is_dir()


def test_onnx_fp32_logits_equal_pytorch(target_run):
    model, ckpt = trained_model(target_run)
    x = first_test_batch(ckpt)
    with torch.no_grad():
        reference = model(x).numpy()
    assert rel_diff(ort_logits(target_run / "model.onnx", x), reference) <= 1e-4
    # the batch axis is dynamic
    assert ort_logits(target_run / "model.onnx", x[:1]).shape == (1, ckpt["num_classes"])
    assert rel_diff(ort_logits(target_run / "model.onnx", x[:5]), reference[:5]) <= 1e-4


def test_int8_model_is_qdq_and_runs(target_run):
    graph = onnx.load(str(target_run / "model.int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer), "weights stored as int8"
    model, ckpt = trained_model(target_run)
    x = first_test_batch(ckpt)
    out = ort_logits(target_run / "model.int8.onnx", x)
    assert out.shape == (x.shape[0], ckpt["num_classes"]) and np.isfinite(out).all()
    with torch.no_grad():
        reference = model(x).numpy()
    assert rel_diff(out, reference) < 0.5  # quantized, not garbage


# ---------------------------------------------------------------------------- the repvgg baseline
def test_repvgg_run_exports_and_quantizes(repvgg_run):
    r = read_json(repvgg_run / "quant.json")
    for key in QUANT_FIELDS:
        assert key in r, key
    assert r["model"] == "repvgg"
    assert 0.0 <= r["int8_top1"] <= 100.0
    assert r["onnx_fp32_max_rel_diff"] <= 1e-4
    model, ckpt = trained_model(repvgg_run)
    x = first_test_batch(ckpt)
    with torch.no_grad():
        reference = model(x).numpy()
    assert rel_diff(ort_logits(repvgg_run / "model.onnx", x), reference) <= 1e-4
    ops = {n.op_type for n in onnx.load(str(repvgg_run / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # folded: one conv per block in the FP32 graph, no BatchNormalization, no Add of branches
    fp32_ops = [n.op_type for n in onnx.load(str(repvgg_run / "model.onnx")).graph.node]
    assert fp32_ops.count("Conv") == len(ArchSpec.from_dict(r["arch"]).blocks)
    assert "BatchNormalization" not in fp32_ops and "Add" not in fp32_ops


# ---------------------------------------------------------------------------- bad input
def test_missing_run_dir_fails_cleanly(workdir, capsys):
    missing = workdir / "no-such-run"
    run_hydra(export_main, [f"run={missing}"], expect_exit=1)
    err = capsys.readouterr().err
    assert "does not exist" in err and str(missing) in err
    assert not missing.exists(), "a mistyped run= must not create the directory"


def test_run_without_checkpoint_fails(workdir, capsys):
    empty = workdir / "empty-run"
    empty.mkdir()
    run_hydra(export_main, [f"run={empty}"], expect_exit=1)
    assert "holds no checkpoint" in capsys.readouterr().err


def test_run_is_required(workdir, capsys):
    run_hydra(export_main, [], expect_exit=1)
    assert "run= is required" in capsys.readouterr().err


def test_stage_one_checkpoint_is_refused(target_run, workdir, capsys):
    fake = workdir / "stage-one"
    fake.mkdir()
    state = load_checkpoint(target_run / "best.pt")
    state["stage"], state["mode"] = "hypersearch", "hs"
    torch.save(state, fake / "last.pt")
    (fake / "metrics.json").write_text('{"status": "completed"}\n')
    before = snapshot(fake)
    run_hydra(export_main, [f"run={fake}"] + EXPORT_FAST, expect_exit=1)
    err = capsys.readouterr().err
    assert "stage-one" in err and "target_train" in err
    assert snapshot(fake) == before
    assert not list(fake.glob(".export-*"))


def test_failed_check_leaves_previous_export_intact(target_run, workdir, monkeypatch, capsys):
    copy = workdir / "target-copy"
    shutil.copytree(target_run, copy)
    before = snapshot(copy)
    monkeypatch.setattr(export_mod, "MAX_REL_DIFF", -1.0)  # every comparison now fails
    run_hydra(export_main, [f"run={copy}"] + EXPORT_FAST, expect_exit=1)
    assert "ONNX Runtime's FP32 logits differ" in capsys.readouterr().err
    assert snapshot(copy) == before, "model.onnx / model.int8.onnx / quant.json must stay as they were"
    assert not list(copy.glob(".export-*"))


# ---------------------------------------------------------------------------- pieces
def test_torchscript_export_is_deterministic(target_run, tmp_path):
    model, _ = trained_model(target_run)
    deployed = fuse(model)
    for name in ("a.onnx", "b.onnx"):
        onnx_io.export_onnx(deployed, tmp_path / name, 32, 17, "torchscript")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert onnx_io.onnx_opset(tmp_path / "a.onnx") == 17


def test_dynamo_exporter_matches(target_run, tmp_path):
    model, ckpt = trained_model(target_run)
    onnx_io.export_onnx(fuse(model), tmp_path / "d.onnx", 32, 18, "dynamo")
    x = first_test_batch(ckpt)[:7]
    with torch.no_grad():
        reference = model(x).numpy()
    assert rel_diff(ort_logits(tmp_path / "d.onnx", x), reference) <= 1e-4
    assert onnx_io.onnx_opset(tmp_path / "d.onnx") >= 18


def test_settings_follow_onnxruntime_cpu_guidance():
    s = quant_mod.choose_settings("auto", None, True, "minmax", machine="x86_64", vnni=False)
    assert (s.activation_type, s.weight_type, s.reduce_range) == ("QUInt8", "QInt8", True)
    s = quant_mod.choose_settings("auto", None, True, "minmax", machine="x86_64", vnni=True)
    assert (s.activation_type, s.reduce_range) == ("QUInt8", False)
    s = quant_mod.choose_settings("auto", None, False, "entropy", machine="aarch64", vnni=None)
    assert (s.activation_type, s.reduce_range, s.per_channel) == ("QInt8", False, False)
    s = quant_mod.choose_settings("int8", True, True, "minmax", machine="x86_64", vnni=True)
    assert (s.activation_type, s.reduce_range) == ("QInt8", True)
    with pytest.raises(quant_mod.ConfigError):
        quant_mod.choose_settings("fp8", None, True, "minmax")


def test_calibration_images_are_unaugmented_training_images(target_run):
    _, ckpt = trained_model(target_run)
    data = build_data(to_typed(ckpt["config"]["data"], DataConfig), "cpu", seed=0)
    batches = list(finished_run.calibration_batches(data, 10, 4))
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    x = torch.cat(batches)
    idx = (torch.arange(10) * data.train.num_samples) // 10
    scale, bias = data.train.scale, data.train.bias
    expected = data.train.images.index_select(0, idx).float() * scale + bias  # no crop, no flip
    torch.testing.assert_close(x, expected)
    # and the same images come out twice: nothing random in the calibration set
    torch.testing.assert_close(torch.cat(list(finished_run.calibration_batches(data, 10, 4))), x)
    # the worker-DataLoader path (used for large image folders) gives the same images
    cfg = to_typed({**ckpt["config"]["data"], "loader": "dataloader", "num_workers": 0}, DataConfig)
    loader_data = build_data(cfg, "cpu", seed=0)
    assert type(loader_data.train).__name__ == "LoaderBatches"
    torch.testing.assert_close(torch.cat(list(finished_run.calibration_batches(loader_data, 10, 4))), x)
