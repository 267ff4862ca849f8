"""The comparison never invents a finding: scipy's Welch interval, no zero-width interval for runs
that do not vary, a re-run sweep counted once, a baseline that no job has refused, ``--latest``
for the sweep run last, and a damaged metrics.json as a row."""

from __future__ import annotations

import math
import os
import re
import shutil
import warnings

import pandas as pd
import pytest
from scipy import stats

from pipelines.compare import UNREADABLE, compare, latest_sweep
from pipelines.compare import main as compare_main
from pipelines.compare.stats import welch
from repopt.errors import ConfigError
from repopt.results import JobMetrics, StageMetrics, Status, write_result

VARIANTS = ("searched", "plain", "init", "repvgg")


def _job(job, overrides: list[str], top1: float | None, variant: str = "searched") -> None:
    """A finished pipeline job as Hydra and the pipeline leave it (no result when ``top1`` is None)."""
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if top1 is not None:
        target = StageMetrics(status=Status.COMPLETED, top1=top1, depth=8, dataset="cifar10", arch="B1cpu")
        write_result(job / "metrics.json", JobMetrics(status=Status.COMPLETED, variant=variant, target=target, top1=top1))


def _sweep(sweep, tops: dict[str, list[float]]) -> None:
    """A finished ``-m sweep=baselines`` sweep: variant -> target top-1 per seed, one job each."""
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    n = 0
    for variant, values in tops.items():
        for seed, top1 in enumerate(values):
            _job(sweep / str(n), ["sweep=baselines", f"variant={variant}", f"hs.seed={seed}"], top1, variant)
            n += 1


def _set_mtime(path, seconds: float) -> None:
    os.utime(path, (seconds, seconds))


# ------------------------------------------------------------------------------------------ Welch


def test_welch_interval_is_scipys_for_a_hand_made_case():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 9.0]
    d = welch(a, b)
    expected = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence_level=0.95)
    assert d.diff == pytest.approx(-2.75) and (d.n_a, d.n_b) == (4, 4)
    assert d.low == pytest.approx(expected.low, abs=1e-6) and d.high == pytest.approx(expected.high, abs=1e-6)
    # the same bounds written out, so that a change of formula shows (Welch-Satterthwaite df = 4.0836)
    assert d.low == pytest.approx(-7.229925433, abs=1e-6) and d.high == pytest.approx(1.729925433, abs=1e-6)
    assert not d.excludes_zero and d.text() == "-2.75 [-7.23, +1.73]"
    narrow = welch(a, b, level=0.5)
    assert d.low < narrow.low < narrow.high < d.high


def test_runs_that_do_not_vary_have_no_interval():
    same = welch([52.58, 52.58], [60.0, 60.0])
    assert math.isnan(same.low) and math.isnan(same.high) and not same.excludes_zero
    assert same.text() == "-7.42 (no spread: n=2 vs 2)"
    assert welch([60.0], [61.0, 62.0]).text() == "-1.50 (n=1 vs 2)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one side constant is exact: no precision warning from scipy
        one_side = welch([70.0, 70.0], [61.0, 62.0])
    assert (one_side.low, one_side.high) == pytest.approx((2.146897632, 14.853102368), abs=1e-6)
    assert one_side.text() == "+8.50 [+2.15, +14.85] *"


# ------------------------------------------------------------------------------------ duplicates


def test_two_copies_of_one_sweep_count_once(tmp_path):
    first, second = tmp_path / "multirun" / "2025-01-01" / "10-00-00", tmp_path / "multirun" / "2025-01-02" / "10-00-00"
    _sweep(first, {"searched": [60.16], "plain": [52.58], "init": [55.0], "repvgg": [58.0]})
    shutil.copytree(first, second)
    for n in range(4):  # the copy is newer, except for its job 0
        _set_mtime(first / str(n), 1_000_000 + (100 if n == 0 else 0))
        _set_mtime(second / str(n), 1_000_050)
    table = compare([first, second], out=tmp_path, plots=True)
    assert list(table["n"]) == [1, 1, 1, 1]
    assert list(table["target_top1"]) == ["60.16", "52.58", "55.00", "58.00"]
    searched = table[table["variant"] == "searched"].iloc[0]
    assert searched["delta_text"] == "+7.58 (n=1 vs 1)" and math.isnan(searched["delta_low"])
    md = (tmp_path / "comparison.md").read_text()
    assert "*" not in md
    assert not re.search(r"\[([+-]\d+\.\d+), \1\]", md)  # no interval of width zero
    assert "(n=1 vs 1)" in md and "(n=2 vs 2)" not in md
    assert sum(line.startswith("Duplicates dropped: 4 jobs") for line in md.splitlines()) == 1
    frame = pd.read_csv(tmp_path / "comparison.csv")
    assert len(frame) == 8 and frame["duplicate"].dtype == bool
    kept = {os.path.relpath(job, tmp_path) for job in frame.loc[~frame["duplicate"], "job"]}
    assert kept == {"multirun/2025-01-01/10-00-00/0", *(f"multirun/2025-01-02/10-00-00/{n}" for n in (1, 2, 3))}


def test_repeats_of_a_seed_count_once_and_other_seeds_stay(tmp_path):
    """The same setting with two seeds, pooled with a copy: n=2 per setting (not 4), and a sweep
    with no duplicates says nothing about them."""
    first, second = tmp_path / "a", tmp_path / "b"
    _sweep(first, {"searched": [60.0, 61.0], "plain": [52.0, 53.0]})
    shutil.copytree(first, second)
    table = compare([first], plots=False)
    assert "Duplicates dropped" not in (first / "comparison.md").read_text()
    pooled = compare([first, second], out=tmp_path, plots=False)
    assert list(pooled["n"]) == [2, 2]
    assert list(pooled["delta_text"]) == list(table["delta_text"]) and pooled["delta_text"].iloc[0].startswith("+8.00 [")
    frame = pd.read_csv(tmp_path / "comparison.csv")
    assert frame["duplicate"].tolist() == [False] * 4 + [True] * 4  # equal mtimes: the first in order stays


def test_another_sweep_config_is_not_a_duplicate(tmp_path):
    """``sweep=`` sets the recipe, so the same variant and seed under another sweep is another job."""
    _job(tmp_path / "0", ["sweep=quickstart", "variant=plain", "hs.seed=0"], 50.0, "plain")
    _job(tmp_path / "1", ["sweep=cifar10_cpu", "variant=plain", "hs.seed=0"], 70.0, "plain")
    _job(tmp_path / "2", ["hs.seed=0", "variant=plain", "sweep=cifar10_cpu"], 71.0, "plain")  # order does not matter
    _set_mtime(tmp_path / "1", 2_000_000)
    _set_mtime(tmp_path / "2", 1_000_000)
    table = compare([tmp_path], plots=False)
    frame = pd.read_csv(tmp_path / "comparison.csv")
    assert frame["duplicate"].tolist() == [False, False, True]  # the newer of the two repeats stays
    assert list(table["n"]) == [2] and list(table["target_top1"]) == ["60.00 ± 14.14 (n=2)"]


def test_jobs_with_unknown_overrides_are_never_repeats(tmp_path):
    for n in range(2):  # killed before the app wrote .hydra/overrides.yaml
        (tmp_path / str(n) / ".hydra").mkdir(parents=True)
    _job(tmp_path / "2", ["variant=plain"], 50.0, "plain")
    (tmp_path / "2" / ".hydra" / "overrides.yaml").write_bytes(b"- variant=pl\xffain\n")
    _job(tmp_path / "3", ["variant=plain"], 51.0, "plain")
    compare([tmp_path], plots=False)
    frame = pd.read_csv(tmp_path / "comparison.csv")
    assert frame["duplicate"].tolist() == [False] * 4
    assert list(frame["status"]) == ["incomplete", "incomplete", "completed", "completed"]


# -------------------------------------------------------------------------------------- baseline


def test_a_baseline_value_that_no_job_has_is_one_error_line(tmp_path, capsys):
    _sweep(tmp_path, {"searched": [60.0], "plain": [52.0], "init": [55.0], "repvgg": [58.0]})
    message = "--baseline variant=plan: no job has variant=plan; the values are: init, plain, repvgg, searched"
    with pytest.raises(ConfigError) as raised:
        compare([tmp_path], plots=False, baseline="variant=plan")
    assert str(raised.value) == message
    assert compare_main([str(tmp_path), "--baseline", "variant=plan", "--no-plots"]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: {message}\n" and captured.out == ""
    assert compare_main([str(tmp_path), "--baseline", "variant=init", "--no-plots"]) == 0


# ---------------------------------------------------------------------------------------- latest


def test_latest_compares_the_sweep_started_last(tmp_path, capsys):
    root = tmp_path / "multirun"
    old, new = root / "2025-01-02" / "09-00-00", root / "2025-01-01" / "10-00-00"  # names do not decide
    _sweep(old, {"searched": [10.0], "plain": [20.0]})
    _sweep(new, {"searched": [60.0], "plain": [52.0]})
    _set_mtime(old / "multirun.yaml", 1_000_000)
    _set_mtime(new / "multirun.yaml", 2_000_000)
    _set_mtime(old, 3_000_000)  # a comparison written into the old sweep later renews its directory
    assert latest_sweep(root) == new and latest_sweep(new) == new
    assert compare_main(["--latest", str(root), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {new / 'comparison.csv'}" in out and f"`{new}`" in out
    assert (new / "comparison.md").is_file() and not (old / "comparison.md").exists()
    assert not (root / "comparison.md").exists()
    jobs = pd.read_csv(new / "comparison.csv")["job"]
    assert all(job.startswith(str(new)) for job in jobs) and len(jobs) == 2


def test_latest_without_a_sweep_is_an_error(tmp_path, capsys):
    _job(tmp_path / "single" / "0", ["variant=plain"], 50.0, "plain")  # a job, but no multirun.yaml
    assert compare_main(["--latest", str(tmp_path / "single"), "--no-plots"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --latest ") and "no sweep below it" in err and err.count("\n") == 1
    assert compare_main(["--latest", str(tmp_path / "missing"), "--no-plots"]) == 1
    assert "not a directory" in capsys.readouterr().err


# --------------------------------------------------------------------------------- damaged files


def test_a_metrics_file_that_is_not_utf8_is_a_row(tmp_path, capsys):
    _sweep(tmp_path, {"searched": [60.0], "plain": [52.0]})
    damaged = tmp_path / "2"
    _job(damaged, ["sweep=baselines", "variant=init", "hs.seed=0"], None)
    (damaged / "metrics.json").write_bytes(b'{"status": "compl\xffeted", "variant": "init"}')
    assert compare_main([str(tmp_path), "--no-plots"]) == 0
    assert "metrics.json is not readable JSON" in capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "comparison.csv")
    row = frame[frame["job"] == str(damaged)].iloc[0]
    assert row["status"] == "incomplete" and row["error"] == UNREADABLE
    assert list(frame["status"]) == ["completed", "completed", "incomplete"]
