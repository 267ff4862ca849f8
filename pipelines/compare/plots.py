"""The comparison's pictures: each setting with its spread over seeds, target accuracy against depth,
the learned scales and the training curves of every job."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pandas as pd

from repopt.plots import pyplot, save_png


def label(row: pd.Series, keys: list[str]) -> str:
    """A setting by its swept values (``searched, [4,6,16,1]``), not by ``key=value`` strings."""
    return ", ".join(str(row[k]) for k in keys if str(row.get(k, "")) != "") or "(defaults)"


def plot_comparison(table: pd.DataFrame, keys: list[str], path: Path) -> None:
    """Target (and HS) top-1 per setting: the mean over seeds with a ±1 std error bar and its value
    written beside it, on an axis fitted to the values so that a gap of a few points is visible. A
    setting with one seed is one measurement: no error bar, and its label says n=1."""
    plt = pyplot()
    counts = table["n"].tolist() if "n" in table else [1] * len(table)
    labels = [f"{label(r, keys)}\n(n={n})" for (_, r), n in zip(table.iterrows(), counts)]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels) + 2.5), 4.4))
    xs = list(range(len(labels)))
    drawn = []
    for offset, column, name in ((-0.12, "target_top1", "target top-1"), (0.12, "hs_top1", "HS top-1")):
        mean, std = table.get(f"{column}_mean"), table.get(f"{column}_std")
        if mean is None or mean.isna().all():
            continue
        std = std.fillna(0.0) if std is not None else 0.0 * mean
        std = std.where([n > 1 for n in counts], 0.0)  # one seed has no spread to draw
        ax.errorbar([x + offset for x in xs], mean, yerr=std, fmt="o", capsize=4, label=name)
        for x, m in zip(xs, mean):
            if not math.isnan(m):
                ax.annotate(
                    f"{m:.1f}",
                    (x + offset, m),
                    textcoords="offset points",
                    xytext=(6, 0),
                    fontsize=7,
                    va="center",
                    annotation_clip=False,
                )
        drawn += [v for v in (mean - std).tolist() + (mean + std).tolist() if not math.isnan(v)]
    if drawn:
        low, high = min(drawn), max(drawn)
        pad = max(1.0, 0.15 * (high - low))
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlim(-0.5, len(xs) - 0.5 + 0.4)  # room for the value written right of the last point
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    several = any(n > 1 for n in counts)
    ax.set_ylabel("test top-1 (%)" + (", mean ± std over seeds" if several else ""))
    ax.set_title("Top-1 per setting" + ("" if several else " (one seed each: no spread shown)"), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def mean_std_line(ax, frame: pd.DataFrame, by: str, label: Callable[[str], str], **style) -> pd.DataFrame:
    """One line of the mean target top-1 per ``by`` value with a std bar over its seeds (none for one seed);
    ``label`` is given the seeds per point ("3, 3, 2"). Returns the points' mean, std and count."""
    stats = frame.groupby(by)["target_top1"].agg(["mean", "std", "count"]).sort_index()
    counts = ", ".join(str(int(c)) for c in stats["count"])
    ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=4, label=label(counts), **style)
    return stats


def plot_depth(frame: pd.DataFrame, path: Path, line_key: str = "variant") -> bool:
    """Target top-1 against conv layers, one line per ``line_key`` value, error bars over seeds.
    Drawn only when the completed jobs have more than one depth."""
    done = (
        frame[(frame["status"] == "completed") & frame["depth"].notna() & frame["target_top1"].notna()]
        if "depth" in frame
        else frame.iloc[0:0]
    )
    if done.empty or done["depth"].nunique() < 2:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups = done.groupby(line_key, sort=False) if line_key in done else [("all jobs", done)]
    for name, group in groups:
        mean_std_line(ax, group, "depth", lambda counts, name=name: f"{name} (n per depth: {counts})")
    ax.set_xlabel("conv layers of the plain network")
    ax.set_ylabel("target test top-1 (%), mean ± std")
    ax.set_title("Target top-1 against depth", fontsize=10)
    ax.set_xticks(sorted(done["depth"].unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    return True


def _plot_per_job(
    frame: pd.DataFrame, keys: list[str], path: Path, files: tuple[str, ...], draw, xlabel: str, ylabel: str, title: str
) -> bool:
    """One line per job from the first of ``files`` (relative to the job dir) that exists; the x axis
    counts (stages, epochs), so its ticks are integers."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for _, row in frame.iterrows():
        found = next((Path(row["job"]) / f for f in files if (Path(row["job"]) / f).is_file()), None)
        if found is not None:
            xs, ys = draw(pd.read_csv(found))
            ax.plot(xs, ys, marker="o", ms=3, label=label(row, keys))
            drawn = True
    if drawn:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_png(fig, path)
    else:
        plt.close(fig)
    return drawn


def plot_scales(frame: pd.DataFrame, keys: list[str], path: Path) -> bool:
    """Mean |scale| per stage for each setting (from the stage-one scales.csv)."""

    def per_stage(summary):
        means = summary.groupby("stage")["abs_mean"].mean()
        return means.index, means.values

    return _plot_per_job(
        frame,
        keys,
        path,
        ("hs/scales.csv", "scales.csv"),
        per_stage,
        "stage",
        "mean |scale|",
        "Searched scales: mean |s| per stage (one line per job)",
    )


def plot_curves(frame: pd.DataFrame, keys: list[str], path: Path) -> bool:
    """Target test top-1 per epoch for each job."""
    return _plot_per_job(
        frame,
        keys,
        path,
        ("target/history.csv", "history.csv"),
        lambda h: (h["epoch"], h["test_top1"]),
        "epoch",
        "test top-1 (%)",
        "Target test top-1 per epoch (one line per job)",
    )
