"""Compare the jobs of one or more sweeps: ``python -m pipelines.compare <sweep_dir> [more dirs…]``,
or ``python -m pipelines.compare --latest outputs/search_and_train/multirun`` for the sweep run last.

Reads every job directory (``.hydra/overrides.yaml``, ``metrics.json``, the stages' histories and
scales summaries; for a ``pipelines.tune`` study, each trial's ``trial.json``: number and state)
into one pandas DataFrame. Works on partial sweeps and on sweeps with failed or unreadable
jobs: those become rows with their status, never a crash. Jobs with exactly the same overrides
(every one, the seed included) are one observation, however many sweeps repeat them: only the
newest (by job directory mtime; on a tie the first in argument order) counts in the table, the
differences and the plots. Writes into ``--out`` (default: the first sweep directory):

* ``comparison.csv`` — one row per job, every override in its own column, and ``duplicate``:
  True for a job left out as a repeat of a newer one;
* ``comparison.md``  — one row per setting (jobs that differ only in seeds are aggregated as
  mean ± std with the count): the overrides, status, HS top-1, target top-1/top-5, wall time,
  and the INT8 columns when ``quant.json`` exists, the pruning columns when a pruning result
  (``pruned/metrics.json``, or the folder ``--pruned`` names) exists; a line says how many
  duplicate jobs were left out;
* ``comparison.png`` (target accuracy per setting with HS accuracy beside it), ``scales.png``
  (mean |scale| per stage for each setting) and ``curves.png`` (target test top-1 per epoch).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
import yaml

from repopt.config import LoggerConfig
from repopt.io import read_json, write_text
from repopt.errors import ConfigError
from repopt.results import JobMetrics, StageMetrics, Status, from_dict, read_result
from repopt.tracking import log_files, require_backend, tracking_uri

from .compare_plots import plot_comparison, plot_curves, plot_depth, plot_scales
from .stats import as_settings, baseline_differences, parse_baseline

log = logging.getLogger("pipelines.compare")
SEED_KEYS = ("seed", "hs.seed", "target.seed")
INCOMPLETE = "incomplete"  # a job killed before it wrote any result: pre-empted or crashed hard
DUPLICATE = "duplicate"  # the comparison.csv column of jobs left out as repeats of a newer one
UNREADABLE = "metrics.json is not readable JSON"
COMPARISON_FILES = ("comparison.csv", "comparison.md", "comparison.png", "depth.png", "scales.png", "curves.png")


def _metric():
    """A numeric column, aggregated as mean ± std over seeds."""
    return field(default=None, metadata={"metric": True})


@dataclass
class JobRow:
    """The result columns of one job in ``comparison.csv``, read from its typed results; every other
    column of the frame is one of the job's overrides."""

    status: str = INCOMPLETE  # a Status value, or "incomplete"
    error: Optional[str] = None
    failed_stage: Optional[str] = None
    diverged_step: Optional[int] = None
    variant: Optional[str] = None
    arch_name: Optional[str] = None  # the target's (or the single stage's) architecture ...
    depth: Optional[int] = None  # ... and its conv layers
    dataset: Optional[str] = None
    hs_top1: Optional[float] = _metric()
    hs_top5: Optional[float] = None
    hs_loss: Optional[float] = None
    target_top1: Optional[float] = _metric()
    target_top5: Optional[float] = _metric()
    target_loss: Optional[float] = _metric()
    target_status: Optional[str] = None
    hs_seconds: Optional[float] = None
    target_seconds: Optional[float] = None
    wall_seconds: Optional[float] = _metric()
    hs_scales_sha256: Optional[str] = None
    scales_sha256: Optional[str] = None
    fp32_top1: Optional[float] = None
    int8_top1: Optional[float] = _metric()
    int8_top1_drop: Optional[float] = _metric()
    prune_ratio: Optional[float] = _metric()  # the pruning step (target_train.prune), when its result exists
    pruned_top1_no_ft: Optional[float] = _metric()  # right after pruning
    pruned_top1: Optional[float] = _metric()  # after fine-tuning
    pruned_macs_ratio: Optional[float] = _metric()  # pruned / unpruned MACs of the deployed model
    pruned_ms_b1: Optional[float] = _metric()  # ONNX Runtime ms per image, batch 1
    pruned_speedup_b1: Optional[float] = _metric()  # unpruned / pruned latency, timed side by side
    pruned_speedup_b32: Optional[float] = _metric()

    @classmethod
    def of_job(cls, m: JobMetrics, job: Path, pruned: str = "pruned") -> "JobRow":
        """A pipeline job: both stages, and the stage that diverged if one did."""
        hs, target = m.hs or StageMetrics(), m.target or StageMetrics()
        trained = m.target or m.hs or StageMetrics()
        row = cls(status=m.status.value, error=m.error, failed_stage=m.failed_stage, variant=m.variant,
                  arch_name=trained.arch, depth=trained.depth, dataset=trained.dataset,
                  hs_top1=hs.top1, hs_top5=hs.top5, target_top1=target.top1, target_top5=target.top5,
                  target_loss=target.loss, target_status=m.target.status.value if m.target else None,
                  hs_seconds=m.wall_seconds.get("hs"), target_seconds=m.wall_seconds.get("target"),
                  wall_seconds=m.wall_seconds.get("total"), hs_scales_sha256=m.hs_scales_sha256,
                  scales_sha256=m.scales_sha256)
        for stage in ("hs", "target"):
            result = read_result(job / stage / "metrics.json", StageMetrics)
            if result is not None and result.status == Status.DIVERGED:
                row.status, row.failed_stage, row.diverged_step = Status.DIVERGED.value, stage, result.diverged_step
        return row.with_quant(job / "target" / "quant.json").with_pruned(job / "target" / pruned / "metrics.json")

    @classmethod
    def of_stage(cls, m: StageMetrics, job: Path, pruned: str = "pruned") -> "JobRow":
        """A single-stage run (``python -m hypersearch -m ...`` or ``target_train -m ...``)."""
        key = "hs" if m.stage == "hypersearch" else "target"
        row = cls(status=m.status.value, error=m.error, wall_seconds=m.wall_seconds, diverged_step=m.diverged_step,
                  arch_name=m.arch, depth=m.depth, dataset=m.dataset,
                  scales_sha256=m.scales_sha256 or (m.scales or {}).get("sha256"),
                  **{f"{key}_top1": m.top1, f"{key}_top5": m.top5, f"{key}_loss": m.loss})
        return row.with_quant(job / "quant.json").with_pruned(job / pruned / "metrics.json")

    def with_quant(self, path: Path) -> "JobRow":
        quant = read_json(path)
        if quant:
            self.fp32_top1, self.int8_top1, self.int8_top1_drop = (quant.get("fp32_top1"), quant.get("int8_top1"),
                                                                  quant.get("top1_drop"))
        return self

    def with_pruned(self, path: Path) -> "JobRow":
        result = read_result(path, StageMetrics)
        p = (result.prune or {}) if result is not None and result.status == Status.COMPLETED else {}
        if p:
            self.prune_ratio, self.pruned_top1_no_ft, self.pruned_top1 = p["ratio"], p["top1_pruned"], p["top1_finetuned"]
            self.pruned_macs_ratio = p["macs_ratio"]
            self.pruned_ms_b1 = p["latency_ms_per_image"]["pruned"]["batch1"]
            self.pruned_speedup_b1, self.pruned_speedup_b32 = p["speedup"]["batch1"], p["speedup"]["batch32"]
        return self


ROW_COLUMNS = tuple(f.name for f in dataclasses.fields(JobRow))
METRIC_COLUMNS = [f.name for f in dataclasses.fields(JobRow) if f.metadata.get("metric")]


def read_result_row(job: Path, pruned: str = "pruned") -> JobRow:
    """The job's ``metrics.json`` through its type: a pipeline job's ``JobMetrics`` or a stage's
    ``StageMetrics``; ``pruned`` names the pruning result folder of its target run."""
    data = read_json(job / "metrics.json")
    if not isinstance(data, dict):  # not written yet, or a file that is not JSON (not even UTF-8)
        return JobRow(error=UNREADABLE if (job / "metrics.json").is_file() else None)
    if "variant" in data:
        return JobRow.of_job(from_dict(JobMetrics, data), job, pruned)
    return JobRow.of_stage(from_dict(StageMetrics, data), job, pruned)


def latest_sweep(root: Path) -> Path:
    """The sweep below ``root`` (or ``root`` itself) that started last: the directory whose
    ``multirun.yaml`` (written once, when Hydra starts the sweep) has the newest mtime. The
    directory's own mtime is no guide: writing a comparison into an old sweep renews it."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--latest {root}: not a directory; pass the root of the sweeps, e.g. outputs/search_and_train/multirun")
    sweeps = [p.parent for p in root.rglob("multirun.yaml") if p.is_file()]
    if not sweeps:
        raise ConfigError(f"--latest {root}: no sweep below it (a sweep directory holds the multirun.yaml of a -m run)")
    return max(sweeps, key=lambda d: ((d / "multirun.yaml").stat().st_mtime, _natural_key(d, root)))


def find_jobs(root: Path) -> list[Path]:
    """Job directories below ``root`` (a job has ``.hydra/``); ``root`` itself if it is one."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; pass a sweep directory (outputs/.../multirun/<date>/<time>) or a job directory")
    if (root / ".hydra").is_dir():
        return [root]
    jobs = sorted({p.parent for p in root.rglob(".hydra") if p.is_dir()}, key=lambda p: _natural_key(p, root))
    return [j for j in jobs if j.parent.name not in ("hs", "target")]


def _natural_key(path: Path, root: Path):
    """Numbers in names sort as numbers: 2 before 10, trial_2 before trial_10."""
    return [[int(piece) if piece.isdigit() else piece for piece in re.split(r"(\d+)", part)]
            for part in path.relative_to(root).parts]


def _parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    key = key.lstrip("+~")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, (list, dict)):
        parsed = value  # keep lists/dicts as their text so the column stays hashable
    return key, parsed


def read_overrides(job: Path) -> list[str] | None:
    """The job's Hydra overrides; None when ``.hydra/overrides.yaml`` is missing or cannot be read."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        overrides = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return None
    return [str(o) for o in overrides or []] if isinstance(overrides, (list, type(None))) else None


def read_job(job: Path, pruned: str = "pruned") -> dict:
    """One row: the job's overrides and its metrics (a missing/partial job is a row, too)."""
    row: dict = {"job": str(job)}
    trial = read_json(job / "trial.json")  # a trial of a pipelines.tune study: its Optuna number and state
    if isinstance(trial, dict):
        row["trial"], row["state"] = trial.get("number"), trial.get("state")
    overrides = read_overrides(job) or []
    row["overrides"] = " ".join(o for o in overrides if not o.startswith("sweep="))
    for text in overrides:
        key, value = _parse_override(text)
        if key != "sweep":
            row[key] = value
    results = dataclasses.asdict(read_result_row(job, pruned))
    row.update({k: v for k, v in results.items() if v is not None or k not in row})  # an unknown result keeps the override
    return row


def collect(dirs: list[Path], pruned: str = "pruned") -> pd.DataFrame:
    """One row per job directory below ``dirs``, in order, with ``duplicate`` marking repeats."""
    jobs = [job for d in dirs for job in find_jobs(Path(d))]
    frame = pd.DataFrame([read_job(job, pruned) for job in jobs])
    for column in METRIC_COLUMNS:
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    if len(frame):
        frame[DUPLICATE] = duplicates(jobs)
    return frame


def duplicates(jobs: list[Path]) -> list[bool]:
    """True for each job whose overrides (all of them: seed and sweep= included, in any order)
    equal a newer job's: the same setting and seed is one observation, and a re-run sweep counted
    twice would narrow the intervals with runs that add nothing. The newest job directory (mtime)
    stays; on a tie, the first. Jobs whose overrides are unknown are never taken for repeats."""
    keep: dict[tuple, int] = {}
    identities = [read_overrides(job) for job in jobs]
    mtimes = [job.stat().st_mtime for job in jobs]
    for i, overrides in enumerate(identities):
        if overrides is None:
            continue
        identity = tuple(sorted(o.strip() for o in overrides))
        if identity not in keep or mtimes[i] > mtimes[keep[identity]]:
            keep[identity] = i
    kept = set(keep.values())
    return [identities[i] is not None and i not in kept for i in range(len(jobs))]


def distinct(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` without the jobs marked as repeats (all of it when nothing is marked)."""
    return frame[~frame[DUPLICATE].astype(bool)] if DUPLICATE in frame else frame


def override_columns(frame: pd.DataFrame) -> list[str]:
    """The swept keys: override columns whose values differ between jobs (seeds last)."""
    skip = {"job", "overrides", DUPLICATE, *ROW_COLUMNS}
    keys = [c for c in frame.columns if c not in skip and frame[c].astype("string").nunique(dropna=False) > 1]
    if "variant" in frame and frame["variant"].nunique(dropna=True) > 1:
        keys = ["variant"] + keys
    return keys


def common_overrides(frame: pd.DataFrame) -> list[str]:
    """Overrides every job shares (shown once above the table instead of in a column)."""
    if "overrides" not in frame or frame.empty:
        return []
    shared = set(str(frame["overrides"].iloc[0]).split())
    for text in frame["overrides"].astype(str):
        shared &= set(text.split())
    return sorted(shared)


def setting_keys(frame: pd.DataFrame, ignore: tuple[str, ...] = ()) -> list[str]:
    """The override columns that tell settings apart (seeds are repeats of one setting; ``ignore``
    names overrides that do not change what is trained, such as ``export``)."""
    return [k for k in override_columns(frame) if k not in SEED_KEYS and k not in ignore]


def aggregate(frame: pd.DataFrame, keys: list[str] | None = None) -> pd.DataFrame:
    """One row per setting: metrics as mean ± std over jobs that differ only in seed (repeats of a
    job with the same seed count once)."""
    keys = setting_keys(frame) if keys is None else keys
    frame = distinct(frame).copy()
    if not keys:
        frame["setting"] = "(defaults)"
        keys = ["setting"]
    frame = as_settings(frame, keys)
    rows = []
    for values, group in frame.groupby(keys, sort=False, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        row = dict(zip(keys, values))
        ok = group[group["status"] == Status.COMPLETED.value]
        statuses = group["status"].value_counts()
        row["status"] = ", ".join(f"{s} x{n}" if n > 1 else str(s) for s, n in statuses.items())
        row["n"] = len(ok)
        for column in METRIC_COLUMNS:
            if column in group:
                values_ok = ok[column].dropna() if column in ok else pd.Series(dtype=float)
                row[column] = _mean_std(values_ok)
                row[f"{column}_mean"] = float(values_ok.mean()) if len(values_ok) else math.nan
                row[f"{column}_std"] = float(values_ok.std(ddof=1)) if len(values_ok) > 1 else math.nan
        depths = group["depth"].dropna() if "depth" in group else []
        row["depth"] = int(depths.iloc[0]) if len(depths) else None
        failed = group[group["status"] != Status.COMPLETED.value]
        if len(failed) and "error" in failed:
            errors = failed["error"].dropna()
            step = failed["diverged_step"].dropna() if "diverged_step" in failed else []
            note = f"diverged at step {int(step.iloc[0])}" if len(step) else ""
            row["note"] = note or (str(errors.iloc[0])[:120] if len(errors) else "")
        rows.append(row)
    return pd.DataFrame(rows)


def _mean_std(values: pd.Series) -> str:
    if len(values) == 0:
        return "—"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f} (n={len(values)})"


PRUNE_COLUMNS = ("prune_ratio", "pruned_top1_no_ft", "pruned_top1", "pruned_macs_ratio", "pruned_ms_b1", "pruned_speedup_b1",
                 "pruned_speedup_b32")
# the table's column titles (a column not listed is titled by its name)
TITLES = {"hs_top1": "HS top-1", "target_top1": "target top-1", "target_top5": "target top-5", "int8_top1": "INT8 top-1",
          "int8_top1_drop": "INT8 drop", "wall_seconds": "wall s", "depth": "conv layers",
          "prune_ratio": "pruned ratio", "pruned_top1_no_ft": "pruned top-1 (no fine-tune)", "pruned_top1": "pruned top-1",
          "pruned_macs_ratio": "MACs kept", "pruned_ms_b1": "pruned ms/img b1", "pruned_speedup_b1": "speed-up b1",
          "pruned_speedup_b32": "speed-up b32"}
DELTA_METRICS = ("target_top1", "pruned_top1", "pruned_top1_no_ft", "int8_top1")


def add_differences(frame: pd.DataFrame, table: pd.DataFrame, keys: list[str], baseline: tuple[str, str] | None,
                    metric: str = "target_top1") -> str | None:
    """``metric`` (target top-1) of each setting minus its reference setting's, with Welch's 95 % interval, as
    columns of ``table`` (``delta_top1``, ``delta_low``, ``delta_high``, ``delta_text``) and of
    ``frame`` (each job carries its setting's; repeats of a job count once). Returns the column title,
    or None without a baseline."""
    if baseline is None:
        return None
    differences = baseline_differences(distinct(frame), keys, baseline, metric)
    for target in (table, frame):
        settings = as_settings(target, keys)[keys].itertuples(index=False, name=None)
        found = [differences.get(tuple(setting)) for setting in settings]
        target["delta_top1"] = [d.diff if d else math.nan for d in found]
        target["delta_low"] = [d.low if d else math.nan for d in found]
        target["delta_high"] = [d.high if d else math.nan for d in found]
        target["delta_excludes_0"] = [d.excludes_zero if d else None for d in found]
        target["delta_text"] = [d.text() if d else "" for d in found]
    return f"Δ {TITLES[metric]} vs {baseline[0]}={baseline[1]} [95 % CI]"


def default_baseline(frame: pd.DataFrame, keys: list[str]) -> tuple[str, str] | None:
    """``variant=plain`` when the sweep has a plain row among other variants."""
    if "variant" in keys and (frame["variant"].astype("string") == "plain").any():
        return ("variant", "plain")
    return None


def synthetic_banner(frame: pd.DataFrame) -> str | None:
    """The first line of the comparison when any job trained on synthetic data."""
    if "dataset" not in frame or not (frame["dataset"] == "synthetic").any():
        return None
    return ("**Synthetic data:** these jobs exercise the plumbing and say nothing about the method. For the "
            "method's effect on real data run `sweep=depth_cpu` and see docs/results/depth_cifar10.md.")


def to_markdown(table: pd.DataFrame, keys: list[str], sources: list[Path], common: list[str] = (),
                delta_title: str | None = None, banner: str | None = None, delta_metric: str = "target_top1",
                dropped: int = 0) -> str:
    columns = keys + ["status"] + [c for c in ("depth", "hs_top1", "target_top1", "target_top5", "int8_top1", "int8_top1_drop",
                                               *PRUNE_COLUMNS, "wall_seconds") if c in table and (table[c].astype(str) != "—").any()
                                   and table[c].notna().any()]
    if delta_title:
        columns.insert(columns.index(delta_metric) + 1 if delta_metric in columns else len(columns), "delta_text")
    if "note" in table and table["note"].fillna("").astype(str).str.len().gt(0).any():
        columns.append("note")
    titles = {**TITLES, "delta_text": delta_title}
    lines = ([banner, ""] if banner else []) + ["# Sweep comparison", "", "Sources: " + ", ".join(f"`{s}`" for s in sources), ""]
    if common:
        lines += ["Every job: `" + " ".join(common) + "`", ""]
    if dropped:
        lines += [f"Duplicates dropped: {dropped} job{'s' if dropped > 1 else ''} repeating another job's overrides, seed "
                  "included (one observation is counted once; marked `duplicate` in comparison.csv).", ""]
    lines += [
             "| " + " | ".join(titles.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        cells = [str(row.get(c, "")) if not (isinstance(row.get(c), float) and math.isnan(row.get(c))) else "" for c in columns]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += ["", "Accuracies are top-1/top-5 in % on each job's test split; a ± b (n=k) is mean ± std over k seeds."]
    if delta_title:
        starred = "delta_excludes_0" in table and bool(table["delta_excludes_0"].eq(True).any())
        lines.append(f"Δ: difference of mean {TITLES[delta_metric]} to the reference setting (same other settings), with Welch's "
                     "95 % interval" + ("; * marks an interval that excludes 0" if starred else "")
                     + "; (n=a vs b) where a side has fewer than 2 seeds, (no spread: n=a vs b) where neither side varies "
                     "over its seeds.")
    lines.append("")
    return "\n".join(lines)


def compare(dirs: list[Path], out: Path | None = None, plots: bool = True, baseline: str | None = None,
            ignore: tuple[str, ...] = (), pruned: str = "pruned", delta_metric: str = "target_top1") -> pd.DataFrame:
    """Build the per-job frame, write the comparison files, return the per-setting table.

    ``baseline`` (``KEY=VALUE``) picks the reference setting of the differences; default: ``variant=plain``
    when there is a plain row. ``ignore`` names overrides that do not tell settings apart. ``pruned``
    names the pruning result folder read for the pruning columns; ``delta_metric`` the column the
    differences are taken of (one of ``DELTA_METRICS``).
    """
    if delta_metric not in DELTA_METRICS:
        raise ConfigError(f"--delta {delta_metric!r}: choose one of {', '.join(DELTA_METRICS)}")
    dirs = [Path(d) for d in dirs]
    frame = collect(dirs, pruned)
    if frame.empty:
        raise FileNotFoundError(f"no job directories (with .hydra/) under {', '.join(map(str, dirs))}")
    out = Path(out) if out else dirs[0]
    keys = setting_keys(frame, ignore)
    table = aggregate(frame, keys)
    reference = parse_baseline(baseline) if baseline else default_baseline(frame, keys)
    delta_title = add_differences(frame, table, keys, reference, delta_metric) if keys or baseline else None
    kept = distinct(frame)
    write_text(out / "comparison.csv", frame.to_csv(index=False))
    write_text(out / "comparison.md", to_markdown(table, keys or ["setting"], dirs, common_overrides(kept), delta_title,
                                                  synthetic_banner(kept), delta_metric, len(frame) - len(kept)))
    if plots:
        plot_comparison(table, keys or ["setting"], out / "comparison.png")
        plot_scales(kept, keys, out / "scales.png")
        plot_curves(kept, keys, out / "curves.png")
        plot_depth(kept, out / "depth.png")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep directories (or single job directories); with "
                        "--latest, roots of sweeps")
    parser.add_argument("--latest", action="store_true",
                        help="compare only the sweep started last below each dir (the one whose multirun.yaml is newest), "
                             "e.g. --latest outputs/search_and_train/multirun; --out then defaults to that sweep")
    parser.add_argument("--out", type=Path, default=None, help="where to write the comparison files (default: the first dir)")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    parser.add_argument("--baseline", default=None, metavar="KEY=VALUE",
                        help="the reference setting of the differences (default: variant=plain when present); each setting "
                             "is compared with the one that has the same other values and KEY=VALUE")
    parser.add_argument("--ignore", default="", metavar="KEYS",
                        help="comma list of overrides that do not tell settings apart (e.g. export,quant.latency_runs "
                             "when sweeps of the same settings were run with and without the export step)")
    parser.add_argument("--pruned", default="pruned", metavar="FOLDER",
                        help="the pruning result folder in each target run (python -m target_train.prune out=FOLDER; "
                             "default: pruned) whose accuracy, MACs and latency columns the table shows")
    parser.add_argument("--delta", default="target_top1", choices=DELTA_METRICS, metavar="METRIC",
                        help="the column whose difference to the reference setting is shown: "
                             + ", ".join(DELTA_METRICS) + " (default: target_top1)")
    parser.add_argument("--mlflow", nargs="?", const="", default=None, metavar="URI",
                        help="also log the comparison files to an MLflow run 'compare' in URI (default: "
                             "sqlite:///<outputs>/mlflow.db, as logger=mlflow does)")
    parser.add_argument("--experiment", default="repopt", help="the MLflow experiment of --mlflow (default: repopt)")
    args = parser.parse_args(argv)
    try:
        dirs = [latest_sweep(d) for d in args.dirs] if args.latest else args.dirs
        out = args.out or dirs[0]
        if args.mlflow is not None:
            require_backend("mlflow")
        table = compare(dirs, args.out, plots=not args.no_plots, baseline=args.baseline,
                        ignore=tuple(k for k in args.ignore.split(",") if k), pruned=args.pruned,
                        delta_metric=args.delta)
        if args.mlflow is not None:
            store = LoggerConfig(name="mlflow", tracking_uri=args.mlflow or None, experiment=args.experiment)
            run_id = log_files(store, out, "compare", [out / name for name in COMPARISON_FILES],
                               {"dirs": " ".join(map(str, dirs)), "baseline": args.baseline, "ignore": args.ignore})
            print(f"logged the comparison files to MLflow run {run_id} ({tracking_uri(store, out)})")
    except (FileNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # --out is not writable (a file, a read-only or full disk): nothing was read wrongly
        print(f"error: cannot write the comparison into {out}: {exc.strerror or exc}; choose another folder with "
              f"--out DIR", file=sys.stderr)
        return 1
    print((out / "comparison.md").read_text())
    print(f"wrote {out / 'comparison.csv'}, {out / 'comparison.md'} and plots ({len(table)} settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
