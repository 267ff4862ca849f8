"""The per-setting table of a comparison: settings told apart by their overrides, seeds aggregated as
mean ± std, differences to a reference setting with Welch intervals, written as Markdown."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from repopt.results import Status

from .jobs import DUPLICATE, METRIC_COLUMNS, ROW_COLUMNS, SEED_KEYS, distinct
from .stats import as_settings, baseline_differences, mean_std


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
                row[column] = mean_std(values_ok, with_n=True)
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


QUANT_COLUMNS = ("int8_top1", "int8_top1_drop", "int8_pt_top1", "int8_pt_top1_drop", "qat_top1", "qat_top1_drop")
PRUNE_COLUMNS = (
    "prune_ratio",
    "pruned_top1_no_ft",
    "pruned_top1",
    "pruned_macs_ratio",
    "pruned_ms_b1",
    "pruned_speedup_b1",
    "pruned_speedup_b32",
)
# the table's column titles (a column not listed is titled by its name)
TITLES = {
    "hs_top1": "HS top-1",
    "target_top1": "target top-1",
    "target_top5": "target top-5",
    "int8_top1": "INT8 top-1",
    "int8_top1_drop": "INT8 drop",
    "int8_pt_top1": "INT8 per-tensor top-1",
    "int8_pt_top1_drop": "INT8 per-tensor drop",
    "qat_top1": "QAT INT8 top-1",
    "qat_top1_drop": "QAT INT8 drop",
    "wall_seconds": "wall s",
    "depth": "conv layers",
    "prune_ratio": "pruned ratio",
    "pruned_top1_no_ft": "pruned top-1 (no fine-tune)",
    "pruned_top1": "pruned top-1",
    "pruned_macs_ratio": "MACs kept",
    "pruned_ms_b1": "pruned ms/img b1",
    "pruned_speedup_b1": "speed-up b1",
    "pruned_speedup_b32": "speed-up b32",
}
DELTA_METRICS = ("target_top1", "pruned_top1", "pruned_top1_no_ft", "int8_top1", "int8_pt_top1", "qat_top1")


def add_differences(
    frame: pd.DataFrame, table: pd.DataFrame, keys: list[str], baseline: tuple[str, str] | None, metric: str = "target_top1"
) -> str | None:
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
    return (
        "**Synthetic data:** these jobs exercise the plumbing and say nothing about the method. For the "
        "method's effect on real data run `sweep=depth_cpu` and see docs/results/depth_cifar10.md."
    )


def to_markdown(
    table: pd.DataFrame,
    keys: list[str],
    sources: list[Path],
    common: list[str] = (),
    delta_title: str | None = None,
    banner: str | None = None,
    delta_metric: str = "target_top1",
    dropped: int = 0,
) -> str:
    columns = (
        keys
        + ["status"]
        + [
            c
            for c in ("depth", "hs_top1", "target_top1", "target_top5", *QUANT_COLUMNS, *PRUNE_COLUMNS, "wall_seconds")
            if c in table and (table[c].astype(str) != "—").any() and table[c].notna().any()
        ]
    )
    if delta_title:
        columns.insert(columns.index(delta_metric) + 1 if delta_metric in columns else len(columns), "delta_text")
    if "note" in table and table["note"].fillna("").astype(str).str.len().gt(0).any():
        columns.append("note")
    titles = {**TITLES, "delta_text": delta_title}
    lines = ([banner, ""] if banner else []) + ["# Sweep comparison", "", "Sources: " + ", ".join(f"`{s}`" for s in sources), ""]
    if common:
        lines += ["Every job: `" + " ".join(common) + "`", ""]
    if dropped:
        lines += [
            f"Duplicates dropped: {dropped} job{'s' if dropped > 1 else ''} repeating another job's overrides, seed "
            "included (one observation is counted once; marked `duplicate` in comparison.csv).",
            "",
        ]
    lines += ["| " + " | ".join(titles.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        cells = [str(row.get(c, "")) if not (isinstance(row.get(c), float) and math.isnan(row.get(c))) else "" for c in columns]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += ["", "Accuracies are top-1/top-5 in % on each job's test split; a ± b (n=k) is mean ± std over k seeds."]
    if delta_title:
        starred = "delta_excludes_0" in table and bool(table["delta_excludes_0"].eq(True).any())
        lines.append(
            f"Δ: difference of mean {TITLES[delta_metric]} to the reference setting (same other settings), with Welch's "
            "95 % interval"
            + ("; * marks an interval that excludes 0" if starred else "")
            + "; (n=a vs b) where a side has fewer than 2 seeds, (no spread: n=a vs b) where neither side varies "
            "over its seeds."
        )
    lines.append("")
    return "\n".join(lines)
