"""The search-then-train pipeline: a two-setting multirun, the comparison table, a failed job."""

import math

import pandas as pd

from pipelines.compare import compare
from pipelines.compare import main as compare_main
from pipelines.search_and_train import main as pipeline_main
from repopt.io import sha256_file
from tests.helpers.runs import pipeline_overrides, read_json, run_hydra


def test_two_setting_multirun_then_compare(in_tmp):
    sweep = in_tmp / "sweep"
    run_hydra(pipeline_main, ["-m"] + pipeline_overrides() + ["hs.optim.lr=0.05,0.2", f"hydra.sweep.dir={sweep}"])
    for job in ("0", "1"):
        for f in ("metrics.json", "hs/scales.safetensors", "hs/metrics.json", "target/metrics.json", "target/last.pt"):
            assert (sweep / job / f).is_file(), (job, f)
        joined = read_json(sweep / job / "metrics.json")
        assert joined["status"] == "completed"
        assert joined["scales_sha256"] == joined["hs_scales_sha256"] == sha256_file(sweep / job / "hs/scales.safetensors")
        # stage two read exactly the file stage one reported writing
        assert joined["target"]["scales"]["path"] == joined["hs"]["scales_file"] == str(sweep / job / "hs" / "scales.safetensors")
        assert set(joined["wall_seconds"]) >= {"hs", "target", "total"}

    assert (sweep / "multirun.yaml").is_file()
    assert compare_main(["--latest", str(in_tmp)]) == 0  # the README's form: the root of the sweeps; --out is the sweep
    frame = pd.read_csv(sweep / "comparison.csv")
    assert len(frame) == 2
    assert sorted(frame["hs.optim.lr"]) == [0.05, 0.2]
    for column in ("hs_top1", "target_top1", "target_top5"):
        assert frame[column].map(math.isfinite).all()
    assert (frame["scales_sha256"] == frame["hs_scales_sha256"]).all()
    assert frame["scales_sha256"].nunique() == 2
    md = (sweep / "comparison.md").read_text()
    assert md.count("| 0.05 |") == 1 and md.count("| 0.2 |") == 1
    for name in ("comparison.png", "scales.png", "curves.png"):
        assert (sweep / name).stat().st_size > 1000


def test_failed_job_is_a_row_not_a_crash(in_tmp):
    sweep = in_tmp / "sweep"
    run_hydra(pipeline_main, ["-m"] + pipeline_overrides() + ["hs.mode=bogus,hs", f"hydra.sweep.dir={sweep}"], expect_exit=1)
    failed = read_json(sweep / "0" / "metrics.json")
    assert failed["status"] == "failed" and "bogus" in failed["error"]
    assert read_json(sweep / "1" / "metrics.json")["status"] == "completed"
    table = compare([sweep], plots=False)
    frame = pd.read_csv(sweep / "comparison.csv")
    assert list(frame["status"]) == ["failed", "completed"]
    assert set(table["hs.mode"]) == {"bogus", "hs"}
    assert "failed" in (sweep / "comparison.md").read_text()


def test_seeds_aggregate_as_mean_std(in_tmp):
    sweep = in_tmp / "sweep"
    run_hydra(pipeline_main, ["-m"] + pipeline_overrides() + ["variant=plain", "target.seed=0,1", f"hydra.sweep.dir={sweep}"])
    table = compare([sweep], plots=False)
    assert len(table) == 1 and table.iloc[0]["n"] == 2
    assert "± " in table.iloc[0]["target_top1"] and "(n=2)" in table.iloc[0]["target_top1"]


def test_export_step_adds_int8_columns(in_tmp):
    """export=true runs ONNX export + INT8 PTQ as a third step; compare shows the INT8 columns."""
    sweep = in_tmp / "sweep"
    run_hydra(
        pipeline_main,
        ["-m"]
        + pipeline_overrides()
        + [
            "variant=plain,repvgg",
            "export=true",
            "quant.calibration_images=32",
            "quant.latency_runs=2",
            f"hydra.sweep.dir={sweep}",
        ],
    )
    for job in ("0", "1"):
        joined = read_json(sweep / job / "metrics.json")
        assert joined["status"] == "completed" and 0 <= joined["quant"]["int8_top1"] <= 100
        assert (sweep / job / "target" / "model.int8.onnx").is_file()
    table = compare([sweep], plots=False)
    assert "int8_top1" in table and "INT8 top-1" in (sweep / "comparison.md").read_text()


def test_a_reused_sweep_dir_with_other_settings_is_refused_and_with_the_same_skips(in_tmp):
    """A sweep run again into its own hydra.sweep.dir: changed settings never exit 0 with the old
    numbers (each job refuses, the sweep exits 1); unchanged settings skip and keep the wall times."""
    sweep = in_tmp / "sweep"
    base = ["-m"] + pipeline_overrides() + ["variant=searched,plain", f"hydra.sweep.dir={sweep}"]
    run_hydra(pipeline_main, base)
    before = [read_json(sweep / str(n) / "metrics.json") for n in range(2)]
    run_hydra(pipeline_main, base + ["target.epochs=2"], expect_exit=1)
    assert [read_json(sweep / str(n) / "metrics.json") for n in range(2)] == before
    run_hydra(pipeline_main, base + ["resume=true"])
    after = [read_json(sweep / str(n) / "metrics.json") for n in range(2)]
    assert [a["wall_seconds"] for a in after] == [b["wall_seconds"] for b in before]
    assert [a["top1"] for a in after] == [b["top1"] for b in before]
