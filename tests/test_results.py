"""Typed results: metrics.json is written from dataclasses and compare reads it through the same types."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest

from pipelines.compare import METRIC_COLUMNS, ROW_COLUMNS, JobRow, compare
from repopt.results import (
    ChannelPruning,
    JobMetrics,
    QuantResult,
    StageMetrics,
    Status,
    from_dict,
    read_result,
    record_failure,
    to_dict,
    write_result,
)


def _job(tmp_path, name: str, overrides: list[str], metrics) -> None:
    job = tmp_path / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        write_result(job / "metrics.json", metrics)


def test_round_trip_through_json_keeps_types(tmp_path):
    job = JobMetrics(
        status=Status.COMPLETED,
        variant="searched",
        wall_seconds={"hs": 1.5, "total": 2.0},
        hs=StageMetrics(status=Status.COMPLETED, stage="hypersearch", top1=12.5, scales_sha256="ab"),
        target=StageMetrics(status=Status.DIVERGED, diverged_step=7, scales={"sha256": "ab"}),
        top1=3.0,
    )
    path = tmp_path / "metrics.json"
    write_result(path, job)
    data = json.loads(path.read_text())
    assert data["status"] == "completed" and data["target"]["status"] == "diverged"  # plain JSON strings
    back = read_result(path, JobMetrics)
    assert back == job and isinstance(back.hs, StageMetrics) and back.target.status is Status.DIVERGED


def test_unknown_keys_are_ignored_on_read_and_refused_on_write(tmp_path):
    assert from_dict(StageMetrics, {"status": "completed", "top1": 1.0, "from_a_newer_version": 3}).top1 == 1.0
    assert from_dict(StageMetrics, {"status": "exploded"}).status is Status.FAILED
    with pytest.raises(TypeError):
        StageMetrics(status=Status.COMPLETED, topp1=1.0)  # a misspelt field fails where it is written


def _channel_pruning() -> ChannelPruning:
    return ChannelPruning(
        ratio=0.5,
        method="repopt",
        top1_before=50.0,
        top1_pruned=20.0,
        top1_finetuned=45.0,
        macs_ratio=0.27,
        widths_before=[16, 32],
        widths_after=[8, 16],
        latency_ms_per_image={"unpruned": {"batch1": 2.0}, "pruned": {"batch1": 1.0}},
        speedup={"batch1": 2.0, "batch32": 1.5},
        int8={"int8_top1": 44.0},
    )


def test_old_prune_and_pruned_keys_read_into_the_channel_pruning_fields(tmp_path):
    """A metrics.json written before the rename (``prune`` / ``pruned``) still reads, typed."""
    record = to_dict(_channel_pruning())
    stage = {"status": "completed", "stage": "prune", "top1": 45.0, "prune": record}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"status": "completed", "pruned": stage, "top1": 50.0}))
    job = read_result(path, JobMetrics)
    assert isinstance(job.channel_pruning_run, StageMetrics) and job.channel_pruning_run.stage == "prune"
    assert job.channel_pruning_run.channel_pruning == _channel_pruning()
    assert from_dict(StageMetrics, stage).channel_pruning.speedup["batch32"] == 1.5
    written = to_dict(job)  # written back under the new names only
    assert "pruned" not in written and "prune" not in written["channel_pruning_run"]
    assert written["channel_pruning_run"]["channel_pruning"] == record
    # a job stopped by the tuner keeps "pruned" as its status, untouched by the renaming
    assert from_dict(JobMetrics, {"status": "pruned"}).status is Status.PRUNED


def test_channel_pruning_and_quant_records_round_trip(tmp_path):
    quant = QuantResult(
        model="target",
        arch={"name": "A0"},
        fp32_top1=50.0,
        int8_top1=49.0,
        top1_drop=1.0,
        latency_ms_per_image={"fp32": {"batch1": 1.0}, "int8": {"batch1": 0.5}},
        files={"model.onnx": {"bytes": 3, "sha256": "ab"}},
        tag="",
        threads=None,
    )
    assert from_dict(QuantResult, to_dict(quant)) == quant
    assert from_dict(ChannelPruning, to_dict(_channel_pruning())) == _channel_pruning()
    assert from_dict(QuantResult, {"int8_top1": 2.0, "from_a_newer_version": 1}) == QuantResult(int8_top1=2.0)
    job = JobMetrics(
        status=Status.COMPLETED,
        quant=quant,
        quant_per_tensor=QuantResult(tag="per_tensor"),
        channel_pruning_run=StageMetrics(status=Status.COMPLETED, channel_pruning=_channel_pruning()),
    )
    path = tmp_path / "metrics.json"
    write_result(path, job)
    back = read_result(path, JobMetrics)
    assert back == job and isinstance(back.quant, QuantResult)
    assert isinstance(back.channel_pruning_run.channel_pruning, ChannelPruning)
    assert json.loads(path.read_text())["quant"] == to_dict(quant)  # the nested record is plain JSON


def test_record_failure_keeps_a_precise_outcome(tmp_path):
    path = tmp_path / "metrics.json"
    record_failure(path, JobMetrics, Status.FAILED, "boom")
    assert read_result(path, JobMetrics) == JobMetrics(status=Status.FAILED, error="boom")
    write_result(path, StageMetrics(status=Status.DIVERGED, diverged_step=3, error="nan"))
    record_failure(path, StageMetrics, Status.FAILED, "later")
    assert read_result(path, StageMetrics).error == "nan"


def test_compare_takes_its_columns_from_the_result_types(tmp_path):
    """Hand-made jobs: two completed pipeline jobs, one diverged, one killed before writing anything."""
    hs = StageMetrics(status=Status.COMPLETED, stage="hypersearch", top1=40.0, scales_sha256="s")

    def job(top1, seconds):
        return JobMetrics(
            status=Status.COMPLETED,
            variant="searched",
            hs=hs,
            target=StageMetrics(status=Status.COMPLETED, top1=top1, top5=top1 + 10, loss=1.0),
            wall_seconds={"hs": 1.0, "target": seconds - 1.0, "total": seconds},
            hs_scales_sha256="s",
            scales_sha256="s",
        )

    _job(tmp_path, "0", ["hs.epochs=1", "seed=0"], job(50.0, 10.0))
    _job(tmp_path, "1", ["hs.epochs=1", "seed=1"], job(54.0, 12.0))
    _job(
        tmp_path,
        "2",
        ["hs.epochs=2", "seed=0"],
        JobMetrics(status=Status.DIVERGED, variant="searched", failed_stage="hs", error="non-finite loss"),
    )
    _job(tmp_path, "3", ["hs.epochs=3", "seed=0"], None)
    table = compare([tmp_path], plots=False)
    frame = pd.read_csv(tmp_path / "comparison.csv")
    assert set(ROW_COLUMNS) <= set(frame.columns)
    assert set(frame.columns) - set(ROW_COLUMNS) == {"job", "overrides", "hs.epochs", "seed", "duplicate"}
    assert not frame["duplicate"].any()
    assert list(frame["status"]) == ["completed", "completed", "diverged", "incomplete"]
    assert METRIC_COLUMNS == [f.name for f in dataclasses.fields(JobRow) if f.metadata.get("metric")]
    first = table[table["hs.epochs"] == "1"].iloc[0]
    assert first["n"] == 2 and first["target_top1"] == "52.00 ± 2.83 (n=2)" and first["wall_seconds_mean"] == 11.0
    diverged = table[table["hs.epochs"] == "2"].iloc[0]
    assert diverged["status"] == "diverged" and diverged["n"] == 0 and diverged["note"] == "non-finite loss"
    assert frame.loc[2, "failed_stage"] == "hs" and frame.loc[1, "target_top5"] == 64.0


def _seed_jobs(tmp_path, values: dict[tuple[str, int], list[float]], dataset: str = "cifar10") -> None:
    """Pipeline jobs by hand: (variant, depth) -> target top-1 per seed."""
    n = 0
    for (variant, depth), tops in values.items():
        for seed, top1 in enumerate(tops):
            target = StageMetrics(status=Status.COMPLETED, top1=top1, depth=depth, dataset=dataset, arch=f"d{depth}")
            _job(
                tmp_path,
                str(n),
                [f"variant={variant}", f"hs.arch.num_blocks=d{depth}", f"hs.seed={seed}"],
                JobMetrics(status=Status.COMPLETED, variant=variant, target=target, top1=top1),
            )
            n += 1


def test_differences_to_the_baseline_match_a_hand_computation(tmp_path):
    _seed_jobs(
        tmp_path,
        {
            ("plain", 28): [60.0, 62.0, 61.0],
            ("searched", 28): [68.0, 70.0, 73.0],
            ("plain", 6): [80.0],
            ("searched", 6): [81.0, 82.0],
        },
    )
    table = compare([tmp_path], plots=True)
    deep = table[(table["variant"] == "searched") & (table["hs.arch.num_blocks"] == "d28")].iloc[0]
    # by hand: means 70.333 and 61; variances 19/3 and 1; se^2 = 19/9 + 1/3 = 22/9;
    # Welch df = (22/9)^2 / ((19/9)^2/2 + (1/3)^2/2) = 2.6162; t_0.975(2.6162) = 3.4636
    se = math.sqrt(22 / 9)
    half = 3.4636 * se
    assert deep["delta_top1"] == pytest.approx(70 + 1 / 3 - 61)
    assert deep["delta_low"] == pytest.approx(70 + 1 / 3 - 61 - half, abs=2e-3)
    assert deep["delta_high"] == pytest.approx(70 + 1 / 3 - 61 + half, abs=2e-3)
    assert deep["delta_excludes_0"] and deep["delta_text"].endswith(" *")
    shallow = table[(table["variant"] == "searched") & (table["hs.arch.num_blocks"] == "d6")].iloc[0]
    assert shallow["delta_top1"] == pytest.approx(1.5) and math.isnan(shallow["delta_low"])
    assert shallow["delta_text"] == "+1.50 (n=2 vs 1)"  # compared with plain at the same depth, not across depths
    plain = table[table["variant"] == "plain"]
    assert plain["delta_top1"].isna().all()
    md = (tmp_path / "comparison.md").read_text()
    assert "Δ target top-1 vs variant=plain [95 % CI]" in md and "+9.33 [+3.92, +14.75] *" in md
    frame = pd.read_csv(tmp_path / "comparison.csv")
    assert frame.loc[frame["variant"] == "searched", "delta_top1"].round(3).tolist() == [9.333, 9.333, 9.333, 1.5, 1.5]
    assert (tmp_path / "depth.png").stat().st_size > 1000 and (tmp_path / "comparison.png").stat().st_size > 1000
    assert not md.startswith("**Synthetic data")


def test_baseline_from_the_command_line_and_a_bad_one(tmp_path, capsys):
    from pipelines.compare import main as compare_main

    _seed_jobs(tmp_path, {("plain", 28): [60.0, 62.0], ("init", 28): [66.0, 67.0], ("searched", 28): [68.0, 70.0]})
    assert compare_main([str(tmp_path), "--baseline", "variant=init", "--no-plots"]) == 0
    assert "Δ target top-1 vs variant=init" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "comparison.csv")
    assert table.loc[table["variant"] == "searched", "delta_top1"].tolist() == [2.5, 2.5]
    assert compare_main([str(tmp_path), "--baseline", "depth=3", "--no-plots"]) == 1
    assert "depth is not a swept setting" in capsys.readouterr().err


def test_no_depth_plot_without_several_depths_and_the_synthetic_banner(tmp_path, capsys):
    from pipelines.compare import main as compare_main

    _seed_jobs(tmp_path, {("plain", 6): [99.0], ("searched", 6): [88.0]}, dataset="synthetic")
    assert compare_main([str(tmp_path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("**Synthetic data:**") and "say nothing about the method" in first
    assert (tmp_path / "comparison.md").read_text().splitlines()[0] == first
    assert not (tmp_path / "depth.png").exists()


def test_an_arch_override_stays_a_setting_of_single_stage_sweeps(tmp_path):
    """``python -m target_train -m arch=tiny,small``: the swept arch is a column of its own, not
    overwritten by the result's architecture name."""
    for n, name in enumerate(("tiny", "small")):
        _job(
            tmp_path,
            str(n),
            [f"arch={name}"],
            StageMetrics(status=Status.COMPLETED, stage="target_train", arch=name, top1=50.0 + n, depth=7 + n),
        )
    table = compare([tmp_path], plots=False)
    assert list(table["arch"]) == ["tiny", "small"] and list(table["depth"]) == [7, 8]
    frame = pd.read_csv(tmp_path / "comparison.csv")
    assert list(frame["arch_name"]) == ["tiny", "small"] and list(frame["target_top1"]) == [50.0, 51.0]
