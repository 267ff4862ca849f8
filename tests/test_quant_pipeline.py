"""The pipeline's quantization steps side by side: PTQ per channel (quant.json) and per tensor
(``ptq_per_tensor``: quant-per_tensor.json), and QAT (``qat``: qat.json); their compare columns, the
re-run that skips them all, and ``target_train.export tag=``."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("torchao", reason="the QAT step needs torchao: pip install 'repopt-pipeline[qat]'")

from pipelines.compare import compare  # noqa: E402
from pipelines.compare import main as compare_main  # noqa: E402
from pipelines.search_and_train import main as pipeline_main  # noqa: E402
from repopt.results import JobMetrics, read_result, to_dict  # noqa: E402
from target_train.export import main as export_main  # noqa: E402
from tests.helpers.runs import pipeline_overrides, read_json, run_hydra  # noqa: E402

FAST = ["calibration_images=32", "latency_runs=2", "latency_warmup=0", "threads=1"]
# variant=plain: no stage one (the steps under test come after stage two); QAT for one epoch
STEPS = (
    ["variant=plain", "export=true", "ptq_per_tensor=true", "qat=true", "qat_train.epochs=1"]
    + [f"quant.{o}" for o in FAST]
    + [f"qat_train.{o}" for o in FAST]
)
RESULTS = {"quant": "quant.json", "quant_per_tensor": "quant-per_tensor.json", "qat": "qat.json"}
# every file the three steps write into the target run
STEP_FILES = (
    "model.onnx",
    "model.int8.onnx",
    "quant.json",
    "model.int8-per_tensor.onnx",
    "quant-per_tensor.json",
    "model.qat.int8.onnx",
    "qat.json",
    "qat_history.csv",
)


# stage two trained past chance (a model at chance predicts one class: every INT8 column would read the same)
TRAINED = {"target.epochs": "4", "target.optim.lr": "0.8", "target.data.synthetic_train_size": "128"}


def _command(job: Path) -> list[str]:
    tiny = [o for o in pipeline_overrides() if o.split("=", 1)[0] not in TRAINED]
    return tiny + [f"{k}={v}" for k, v in TRAINED.items()] + STEPS + [f"hydra.run.dir={job}"]


def _state(folder: Path, names) -> dict[str, tuple[int, str]]:
    """mtime (ns) and sha256 of each file: a skipped step neither rewrites nor changes it."""
    return {n: ((folder / n).stat().st_mtime_ns, hashlib.sha256((folder / n).read_bytes()).hexdigest()) for n in names}


@pytest.fixture(scope="module")
def job(workdir) -> Path:
    job_dir = workdir / "job"
    run_hydra(pipeline_main, _command(job_dir))
    return job_dir


def test_the_three_steps_write_their_files_and_records(job):
    target = job / "target"
    for name in STEP_FILES:
        assert (target / name).is_file(), name
    summary = read_result(job / "metrics.json", JobMetrics)
    assert summary.status.value == "completed"
    for field, name in RESULTS.items():  # the job records each step's own file, as written
        record = getattr(summary, field)
        assert (record if isinstance(record, dict) else to_dict(record)) == read_json(target / name), field
    assert summary.quant.quantization["per_channel"] is True and summary.quant.tag == ""
    per_tensor = summary.quant_per_tensor
    assert per_tensor.quantization["per_channel"] is False and per_tensor.tag == "per_tensor"
    assert per_tensor.files["model.onnx"] == summary.quant.files["model.onnx"]  # one FP32 model for both
    assert summary.qat["epochs"] == 1 and 0 <= summary.qat["int8_top1"] <= 100
    assert {"target", "export", "export_per_tensor", "qat", "total"} <= set(summary.wall_seconds)


def test_compare_shows_the_three_columns(job):
    table = compare([job], plots=False)
    row = pd.read_csv(job / "comparison.csv").iloc[0]
    quant, per_tensor, qat = (read_json(job / "target" / RESULTS[k]) for k in ("quant", "quant_per_tensor", "qat"))
    expected = {
        "int8_top1": quant["int8_top1"],
        "int8_top1_drop": quant["top1_drop"],
        "int8_pt_top1": per_tensor["int8_top1"],
        "int8_pt_top1_drop": per_tensor["top1_drop"],
        "qat_top1": qat["int8_top1"],
        "qat_top1_drop": qat["top1_drop"],
    }
    for column, value in expected.items():
        assert row[column] == pytest.approx(value), column
        assert table.iloc[0][column] == f"{value:.2f}", column  # one job: the value itself
    md = (job / "comparison.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| setting"))
    for title in ("INT8 top-1", "INT8 drop", "INT8 per-tensor top-1", "INT8 per-tensor drop", "QAT INT8 top-1", "QAT INT8 drop"):
        assert f"| {title} |" in header, title
    assert compare_main([str(job), "--no-plots", "--delta", "qat_top1"]) == 0
    assert compare_main([str(job), "--no-plots", "--delta", "int8_pt_top1"]) == 0


def test_a_rerun_skips_every_step_and_changed_settings_are_refused(job, capsys):
    target = job / "target"
    names = STEP_FILES + ("metrics.json", "last.pt", "best.pt")
    before, summary = _state(target, names), read_json(job / "metrics.json")
    run_hydra(pipeline_main, _command(job))
    assert _state(target, names) == before, "a completed job must not redo a step"
    assert read_json(job / "metrics.json") == summary  # the wall times of the steps as they ran
    # another QAT setting for the same job directory: refused before anything runs
    run_hydra(pipeline_main, _command(job) + ["qat_train.epochs=2"], expect_exit=1)
    assert "qat_train.epochs: 1 -> 2" in capsys.readouterr().err
    assert _state(target, names) == before and read_json(job / "metrics.json") == summary


def test_bad_tag_is_a_one_line_error(job, workdir, capsys):
    run_hydra(export_main, [f"run={job / 'target'}", "tag=a.b"], expect_exit=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tag='a.b'" in err[0] and "letters, digits, _ and -" in err[0]
    assert not (job / "target" / "quant-a.b.json").exists()
    # the pipeline leaves the names to itself
    run_hydra(pipeline_main, _command(workdir / "tagged-job") + ["quant.tag=mine"], expect_exit=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quant.tag=mine" in err[0]


def test_tagged_export_leaves_the_untagged_files_unchanged(job, workdir, capsys):
    run = workdir / "tagged"
    shutil.copytree(job / "target", run)
    untagged = ("model.onnx", "model.int8.onnx", "quant.json")
    before = _state(run, untagged)
    run_hydra(export_main, [f"run={run}", "tag=pt-2", "per_channel=false"] + FAST)
    assert _state(run, untagged) == before
    tagged = read_json(run / "quant-pt-2.json")
    assert tagged["tag"] == "pt-2" and tagged["quantization"]["per_channel"] is False
    assert set(tagged["files"]) == {"model.onnx", "model.int8-pt-2.onnx"}
    assert tagged["files"]["model.onnx"]["sha256"] == read_json(run / "quant.json")["files"]["model.onnx"]["sha256"]
    assert (run / "model.int8-pt-2.onnx").is_file()
    # another FP32 model (opset 18) cannot share model.onnx with quant.json: refused, nothing written
    before = _state(run, untagged + ("quant-pt-2.json", "model.int8-pt-2.onnx"))
    run_hydra(export_main, [f"run={run}", "tag=opset18", "opset=18"] + FAST, expect_exit=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from this export's FP32 model" in err[0]
    assert _state(run, untagged + ("quant-pt-2.json", "model.int8-pt-2.onnx")) == before
    assert not (run / "quant-opset18.json").exists() and not list(run.glob(".export-*"))


def test_qarepvgg_through_export_and_qat(workdir):
    """``variant=qarepvgg qat=true`` end to end: the QARepVGG target is folded, quantized both ways and
    QAT-trained, and the job records each step with the model it exported."""
    job_dir = workdir / "qarepvgg"
    command = [o.replace("variant=plain", "variant=qarepvgg") for o in _command(job_dir)]
    run_hydra(pipeline_main, command)
    joined = read_json(job_dir / "metrics.json")
    assert joined["status"] == "completed" and joined["variant"] == "qarepvgg"
    assert joined["target"]["model"] == "qarepvgg"
    for field, name in RESULTS.items():
        assert joined[field]["model"] == "qarepvgg", field
        assert joined[field]["int8_top1"] == read_json(job_dir / "target" / name)["int8_top1"]
