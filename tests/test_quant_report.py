"""pipelines.quant_report on job directories written in the real layout with known numbers: the
table's means, drops and the Welch difference of the drops are the arithmetic of those numbers."""

import json
from pathlib import Path

from pipelines.compare.stats import welch
from pipelines.quant_report import collect, main, report


def _job(root: Path, name: str, variant: str, seed: int, fp32: float, pc: float, pt: float, qat: float, absmax: float) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / "target").mkdir()
    (job / "metrics.json").write_text(
        json.dumps({"status": "completed", "variant": variant, "config": {"target": {"seed": seed}}})
    )
    layers = [
        {"kind": "conv3x3", "absmax_over_std": absmax, "weight_std": 0.1, "weight_absmax": absmax * 0.1},
        {"kind": "linear", "absmax_over_std": 99.0, "weight_std": 9.0, "weight_absmax": 9.0},
    ]  # the head is not a conv
    latency = {"fp32": {"batch1": 0.2, "batch32": 0.05}, "int8": {"batch1": 0.1, "batch32": 0.03}}
    (job / "target" / "quant.json").write_text(
        json.dumps({"fp32_top1": fp32, "int8_top1": pc, "layers": layers, "latency_ms_per_image": latency})
    )
    (job / "target" / "quant-per_tensor.json").write_text(json.dumps({"int8_top1": pt}))
    (job / "target" / "qat.json").write_text(json.dumps({"int8_top1": qat}))


def test_quant_report_numbers(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _job(sweep, "0", "searched", 0, 50.0, 49.5, 49.0, 49.8, 4.0)
    _job(sweep, "1", "searched", 1, 52.0, 51.3, 50.0, 51.9, 5.0)
    _job(sweep, "2", "repvgg", 0, 51.0, 48.0, 30.0, 50.0, 12.0)
    _job(sweep, "3", "repvgg", 1, 53.0, 49.0, 35.0, 52.0, 14.0)
    (sweep / "4" / ".hydra").mkdir(parents=True)  # a job never exported: not a candidate, not listed
    rows, missing = collect([sweep])
    assert len(rows) == 4 and missing == []
    text = report(rows)
    assert "| searched | 2 | 51.00 ± 1.41 | 50.40 ± 1.27 | 49.50 ± 0.71 | 50.85 ± 1.48 |" in text
    d = welch([51.0 - 30.0, 53.0 - 35.0], [50.0 - 49.0, 52.0 - 50.0])  # per-tensor drops: repvgg vs searched
    assert f"| 19.50 ± 2.12 | {d.diff:+.2f} [{d.low:+.2f}, {d.high:+.2f}]" in text and d.diff == 18.0
    assert "| repvgg | 13.00 |" in text  # the median conv abs-max/std, the linear head left out
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "quantization.md").read_text() == text


def test_quant_report_without_results_is_one_line(tmp_path, capsys):
    (tmp_path / "j" / ".hydra").mkdir(parents=True)
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run python -m target_train.export" in err
