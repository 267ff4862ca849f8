"""``python -m target_train.qat``: QAT of a finished stage-two run, its QDQ ONNX file, the folded masks, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torchao", reason="the QAT step needs torchao: pip install 'repopt-pipeline[qat]'")

from repopt.config import to_typed  # noqa: E402
from repopt.engine import load_checkpoint  # noqa: E402
from repopt.errors import ConfigError  # noqa: E402
from repopt.numerics import rel_diff  # noqa: E402
from target_train import finished_run  # noqa: E402
from target_train import qat_trainer as qat_mod  # noqa: E402
from target_train import quantize as quant_mod  # noqa: E402
from target_train.export import main as export_main  # noqa: E402
from target_train.handler import fuse  # noqa: E402
from target_train.optim import RepOptSGD  # noqa: E402
from target_train.qat import main as qat_main  # noqa: E402
from target_train.step_config import QatConfig, validate_qat  # noqa: E402
from tests.helpers.runs import TINY, read_json, run_hydra  # noqa: E402

FAST = ["latency_runs=3", "latency_warmup=1", "threads=1"]
EXPORT_FAST = ["calibration_images=64"] + FAST
# the exaggeration of test_qat_recovers_what_ptq_loses: one output channel of this layer is scaled up
# DEAD_FACTOR times and its ReLU kept shut, so the per-tensor int8 grid of the layer spans a channel that
# never fires: the other channels' kernels keep only a few grid steps. The fp32 model is unchanged but for
# that one channel (out of 16).
DEAD_LAYER, DEAD_FACTOR = "stage2.1", 100.0


def _run(main, run_dir: Path, extra: list[str]) -> dict:
    run_hydra(main, [f"run={run_dir}"] + FAST + list(extra))
    return read_json(run_dir / ("qat.json" if main is qat_main else "quant.json"))


@pytest.fixture(scope="module")
def trained_run(workdir) -> Path:
    """A tiny target run trained far enough (8 epochs, ~75 % test top-1 on the synthetic set) that
    losing precision shows in its accuracy; scales=init, so its checkpoint records scales for masks."""
    from target_train.app import main as target_main

    run_dir = workdir / "trained"
    run_hydra(target_main, TINY + ["epochs=8", "optim.lr=0.8", "scales=init", "compile=false", f"hydra.run.dir={run_dir}"])
    assert (run_dir / "best.pt").is_file()
    return run_dir


def run_bundle(run_dir: Path):
    """The run's data as the QAT step loads it."""
    ckpt = load_checkpoint(run_dir / "best.pt")
    cfg = QatConfig(run=str(run_dir))
    data_cfg, seed = finished_run.data_config(ckpt, run_dir, cfg)
    return finished_run.load_data(data_cfg, seed, cfg)


@torch.no_grad()
def kill_wide_channel(src: Path, dest: Path, layer: str, factor: float) -> int:
    """Copy the run to ``dest`` with one output channel of ``layer`` scaled by ``factor`` and its bias
    pushed below every pre-activation the data produce (ReLU keeps it at 0): the channel with the
    smallest BN gamma, so the fp32 model loses the least. Returns the channel."""
    shutil.copytree(src, dest)
    model, ckpt = finished_run.load_model(dest / "best.pt")
    conv, bn = model.get_submodule(f"{layer}.conv"), model.get_submodule(f"{layer}.bn")
    c = int(bn.weight.abs().argmin())
    conv.weight[c] *= factor
    highest = []
    hook = bn.register_forward_hook(lambda m, i, out: highest.append(float(out[:, c].max())))
    bundle = run_bundle(dest)
    for e in range(3):
        for x, _ in bundle.train.epoch(e):
            model(x)
    for x, _ in bundle.test.epoch(0):
        model(x)
    hook.remove()
    bn.bias[c] -= 2 * max(max(highest), 0.0) + 1.0  # margin: QAT moves the earlier layers a little
    ckpt["model"] = model.state_dict()
    torch.save(ckpt, dest / "best.pt")
    (dest / "last.pt").unlink()
    return c


def onnx_nll(path: Path, bundle) -> float:
    """Mean cross-entropy of an ONNX model's logits on the test set: finer than top-1 on 64 images."""
    sess = quant_mod.session(path, 1)
    total, n = 0.0, 0
    for x, y in bundle.test.epoch(0):
        logits = torch.from_numpy(quant_mod.run_session(sess, x))
        total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        n += int(y.shape[0])
    return total / n


# ---------------------------------------------------------------------------- QAT against PTQ
def test_qat_recovers_what_ptq_loses(trained_run, workdir):
    """Per-tensor int8 weights with one never-firing channel 100x wider than the rest: PTQ rounds the
    other channels to a few steps and loses a large part of the accuracy; QAT trains the rest of the
    network against that rounding and gets much of it back. With epochs=0 (no training) QAT would be a
    calibration like PTQ's and fail the margin."""
    run_dir = workdir / "dead-channel"
    kill_wide_channel(trained_run, run_dir, DEAD_LAYER, DEAD_FACTOR)
    ptq = _run(export_main, run_dir, EXPORT_FAST + ["per_channel=false"])
    r = _run(qat_main, run_dir, ["per_channel=false", "epochs=3", "lr=0.01", "calibration_images=64"])
    assert r["fp32_top1"] == pytest.approx(ptq["fp32_top1"])  # the same folded model under both
    assert ptq["top1_drop"] >= 15.0, f"the exaggeration must make PTQ lose visibly: {ptq['top1_drop']:.1f} points"
    assert r["int8_top1"] >= ptq["int8_top1"] + 8.0, (r["int8_top1"], ptq["int8_top1"])
    bundle = run_bundle(run_dir)
    assert onnx_nll(run_dir / "model.qat.int8.onnx", bundle) < onnx_nll(run_dir / "model.int8.onnx", bundle) - 0.1
    # the report: every field, the settings, the history
    for key in (
        "fp32_top1",
        "fake_quant_top1",
        "int8_top1",
        "int8_top5",
        "top1_drop",
        "epochs",
        "lr",
        "steps",
        "onnx_int8_vs_converted_max_rel_diff",
        "onnx_int8_vs_fake_quant_max_rel_diff",
        "latency_ms_per_image",
        "quantization",
        "versions",
        "masks",
        "files",
    ):
        assert key in r, key
    assert r["top1_drop"] == pytest.approx(r["fp32_top1"] - r["int8_top1"])
    assert r["quantization"]["per_channel"] is False and r["quantization"]["weight_symmetric"] is True
    assert r["epochs"] == 3 and r["lr"] == 0.01 and r["masks"] is False and "torchao" in r["versions"]
    assert r["steps"] == 3 * 128 // 32
    rows = (run_dir / "qat_history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,lr,train_loss") and len(rows) == 1 + 3
    assert (run_dir / "history.csv").read_text() == (trained_run / "history.csv").read_text(), "the run's own history"
    assert not list(run_dir.glob(".qat-*")), "the scratch folder must be gone"
    assert (run_dir / "qat_logs").is_dir()


# ---------------------------------------------------------------------------- the ONNX file
# ONNX Runtime's integer kernels and the converted PyTorch model compute the same integers (int32
# accumulation of int8 products, int32 bias, one rounding per requantization) but where a float summed in
# another order tips a requantization: a few steps of the logits' int8 grid at most. The bound,
# qat.ONNX_MAX_DIFF = 0.05 of max(max|logit|, 1), is the app's own check; measured here: 0-1 logit steps
# (<= 0.008). A wrong scale, zero point, axis or bias would be off by the order of the logits.
@pytest.mark.parametrize("per_channel", [True, False])
def test_onnx_file_matches_converted_model(trained_run, tmp_path, per_channel):
    model, _ = finished_run.load_model(trained_run / "best.pt")
    bundle = run_bundle(trained_run)
    x, _ = next(iter(bundle.test.epoch(0)))
    settings = quant_mod.choose_settings("auto", None, per_channel, "minmax")
    prepared = qat_mod.prepare(fuse(model), settings, x[:2])
    assert qat_mod.calibrate(prepared, finished_run.calibration_batches(bundle, 64, 32)) == 64
    converted = qat_mod.convert(prepared)
    path = tmp_path / "qat.onnx"
    nodes = qat_mod.export_qat_onnx(converted, path, 32, 18)
    assert nodes["QuantizeLinear"] >= 1 and nodes["DequantizeLinear"] >= 1
    graph = onnx.load(str(path)).graph
    kinds = {init.data_type for init in graph.initializer}
    assert onnx.TensorProto.INT8 in kinds and onnx.TensorProto.INT32 in kinds, "int8 weights, int32 biases"
    sess = quant_mod.session(path, 1)
    with torch.no_grad():
        reference = converted(x).numpy()
        fake_quant = prepared(x).numpy()
    out = quant_mod.run_session(sess, x)
    assert qat_mod.floored_diff(out, reference) <= qat_mod.ONNX_MAX_DIFF
    assert rel_diff(out, reference) <= 0.02  # and within ~2 logit steps: these logits span several units
    single = quant_mod.run_session(sess, x[:1])  # the batch axis is dynamic
    assert single.shape == (1, reference.shape[1]) and qat_mod.floored_diff(single, reference[:1]) <= qat_mod.ONNX_MAX_DIFF
    # the trained (fake-quant) model differs from the converted one only by the int32 rounding of the biases
    assert rel_diff(fake_quant, reference) <= 0.05
    # and the graph runs as integer kernels in ONNX Runtime, like export's model.int8.onnx
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    optimized = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "QLinearConv" in optimized, optimized


# ---------------------------------------------------------------------------- masks
def test_folded_masks_equal_the_repoptimizer_step(trained_run):
    """One masked SGD step on the folded kernels (t^2 M) equals the fold of one RepOptimizer step on the
    trained kernels (mask M) with the BN frozen; the mask M alone on the folded kernels does not."""
    model, ckpt = finished_run.load_model(trained_run / "best.pt")
    x, y = next(iter(run_bundle(trained_run).test.epoch(0)))
    deployed = fuse(model)
    folded = qat_mod.folded_masks(model, deployed, ckpt["scales"])
    lr = 0.05

    convs = {n: p for n, p in model.named_parameters() if n in folded}
    masks = qat_mod.grad_masks(model, ckpt["scales"], rule="sgd")
    step = RepOptSGD(list(convs.values()), {convs[n]: m for n, m in masks.items()}, lr=lr, compiled=False)
    torch.nn.functional.cross_entropy(model(x), y).backward()  # eval mode: the BN is frozen
    step.step()
    expected = dict(fuse(model).named_parameters())

    def folded_step(masks: dict) -> dict:
        d = fuse(finished_run.load_model(trained_run / "best.pt")[0])
        params = dict(d.named_parameters())
        torch.nn.functional.cross_entropy(d(x), y).backward()
        with torch.no_grad():
            for name, mask in masks.items():
                params[name] -= lr * mask * params[name].grad
        return params

    exact = folded_step(folded)
    plain = folded_step(masks)
    for name in folded:
        assert rel_diff(exact[name], expected[name]) <= 1e-5, name
    assert max(rel_diff(plain[n], expected[n]) for n in folded) > 1e-4, "t^2 must matter after training"


def test_masks_run_and_require_scales(trained_run, workdir, capsys):
    run_dir = workdir / "masked"
    shutil.copytree(trained_run, run_dir)
    r = _run(qat_main, run_dir, ["masks=true", "epochs=1", "lr=0.01", "calibration_images=64"])
    assert r["masks"] is True and "masks" in r["optimizer"]
    assert r["onnx_int8_vs_converted_floored_diff"] <= qat_mod.ONNX_MAX_DIFF
    # a run whose checkpoint records no scales (model=repvgg, scales=none) cannot use masks
    bare = workdir / "no-scales"
    bare.mkdir()
    state = load_checkpoint(trained_run / "best.pt")
    del state["scales"]
    torch.save(state, bare / "best.pt")
    run_hydra(qat_main, [f"run={bare}", "masks=true"], expect_exit=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "masks=true needs the run's scales" in err[0] and "masks=false" in err[0]
    assert not list(bare.glob(".qat-*")) and not (bare / "qat.json").exists()


def test_failed_check_leaves_the_run_as_it_was(trained_run, workdir, monkeypatch, capsys):
    run_dir = workdir / "failing-check"
    shutil.copytree(trained_run, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    monkeypatch.setattr(qat_mod, "ONNX_MAX_DIFF", -1.0)  # every comparison now fails
    run_hydra(qat_main, [f"run={run_dir}", "epochs=0", "calibration_images=64"] + FAST, expect_exit=1)
    assert "ONNX Runtime's INT8 logits differ" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before, "nothing written or changed"
    assert not list(run_dir.glob(".qat-*"))


# ---------------------------------------------------------------------------- bad input
def test_config_composes_with_the_schema_defaults():
    from hydra import compose, initialize_config_module

    with initialize_config_module("repopt.conf", version_base="1.3"):
        cfg = compose("qat", overrides=["run=/tmp/somewhere"])
    # the yaml restates the schema's defaults, nothing else
    assert to_typed(cfg, QatConfig) == QatConfig(run="/tmp/somewhere")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "run= is required"),
        (["run=RUN", "epochs=-1"], "epochs must be >= 0"),
        (["run=RUN", "lr=0"], "lr must be a positive number"),
        (["run=RUN", "momentum=1.5"], "momentum must be in [0, 1)"),
        (["run=RUN", "opset=17"], "opset 18 or newer"),
        (["run=RUN", "checkpoint=first"], "choose best or last"),
        (["run=MISSING"], "does not exist"),
    ],
)
def test_config_errors_are_one_line(workdir, capsys, overrides, message):
    existing = workdir / "some-run"
    existing.mkdir(exist_ok=True)
    overrides = [o.replace("RUN", str(existing)).replace("MISSING", str(workdir / "no-such-run")) for o in overrides]
    run_hydra(qat_main, overrides, expect_exit=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (workdir / "no-such-run").exists(), "a mistyped run= must not create the directory"


def test_settings_are_validated_before_any_work():
    with pytest.raises(ConfigError, match="calibration_images"):
        validate_qat(QatConfig(run="x", calibration_images=0))
    with pytest.raises(ConfigError, match="lr must be"):
        validate_qat(QatConfig(run="x", lr=float("nan")))
    validate_qat(QatConfig(run="x"))  # the defaults are valid


def test_quantizer_uses_onnxruntime_ranges():
    from target_train.ort_quantizer import activation_range, qat_specs, weight_range

    assert weight_range(False) == (-127, 127) and weight_range(True) == (-64, 64)
    assert activation_range("QUInt8") == (torch.uint8, 0, 255) and activation_range("QInt8") == (torch.int8, -128, 127)
    act, weight = qat_specs(quant_mod.choose_settings("int8", True, False, "minmax"))
    assert (act.dtype, act.quant_min, act.quant_max, act.qscheme) == (torch.int8, -128, 127, torch.per_tensor_affine)
    assert (weight.quant_min, weight.quant_max, weight.qscheme) == (-64, 64, torch.per_tensor_symmetric)
    _, weight = qat_specs(quant_mod.choose_settings("uint8", False, True, "minmax"))
    assert (weight.quant_min, weight.quant_max, weight.qscheme, weight.ch_axis) == (-127, 127, torch.per_channel_symmetric, 0)
