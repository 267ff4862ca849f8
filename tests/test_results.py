"""Typed results: metrics.json is written from dataclasses and compare reads it through the same types."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from pipelines.compare import METRIC_COLUMNS, ROW_COLUMNS, JobRow, compare
from repopt.results import (JobMetrics, StageMetrics, Status, from_dict, read_result, record_failure, to_dict,
                            write_result)


def _job(tmp_path, name: str, overrides: list[str], metrics) -> None:
    job = tmp_path / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        write_result(job / "metrics.json", metrics)


def test_round_trip_through_json_keeps_types(tmp_path):
    job = JobMetrics(status=Status.COMPLETED, variant="searched", wall_seconds={"hs": 1.5, "total": 2.0},
                     hs=StageMetrics(status=Status.COMPLETED, stage="hypersearch", top1=12.5, scales_sha256="ab"),
                     target=StageMetrics(status=Status.DIVERGED, diverged_step=7, scales={"sha256": "ab"}), top1=3.0)
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
        return JobMetrics(status=Status.COMPLETED, variant="searched", hs=hs,
                          target=StageMetrics(status=Status.COMPLETED, top1=top1, top5=top1 + 10, loss=1.0),
                          wall_seconds={"hs": 1.0, "target": seconds - 1.0, "total": seconds}, hs_scales_sha256="s",
                          scales_sha256="s")

    _job(tmp_path, "0", ["hs.epochs=1", "seed=0"], job(50.0, 10.0))
    _job(tmp_path, "1", ["hs.epochs=1", "seed=1"], job(54.0, 12.0))
    _job(tmp_path, "2", ["hs.epochs=2", "seed=0"], JobMetrics(status=Status.DIVERGED, variant="searched",
                                                             failed_stage="hs", error="non-finite loss"))
    _job(tmp_path, "3", ["hs.epochs=3", "seed=0"], None)
    table = compare([tmp_path], plots=False)
    frame = pd.read_csv(tmp_path / "comparison.csv")
    assert set(ROW_COLUMNS) <= set(frame.columns)
    assert set(frame.columns) - set(ROW_COLUMNS) == {"job", "overrides", "hs.epochs", "seed"}
    assert list(frame["status"]) == ["completed", "completed", "diverged", "incomplete"]
    assert METRIC_COLUMNS == [f.name for f in dataclasses.fields(JobRow) if f.metadata.get("metric")]
    first = table[table["hs.epochs"] == "1"].iloc[0]
    assert first["n"] == 2 and first["target_top1"] == "52.00 ± 2.83 (n=2)" and first["wall_seconds_mean"] == 11.0
    diverged = table[table["hs.epochs"] == "2"].iloc[0]
    assert diverged["status"] == "diverged" and diverged["n"] == 0 and diverged["note"] == "non-finite loss"
    assert frame.loc[2, "failed_stage"] == "hs" and frame.loc[1, "target_top5"] == 64.0
