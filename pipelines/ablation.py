"""The ablation report: ``python -m pipelines.ablation --table <sweeps> --budget <sweeps> --out <dir>``.

Answers "does the search matter?" from the sweeps of ``sweep=ablation_cpu`` (the paper's Table 4:
one row per variant) and ``sweep=hs_budget_cpu`` (the searched scales after searches of several
lengths). Writes into ``--out``:

* ``ablation.md``: per variant the target top-1 (mean ± std, n, every seed's value) and its Welch
  difference with 95 % interval against ``plain`` and against ``init``; per search budget the same
  for ``searched`` against ``init``; how far the searched scales moved from their initialization,
  per stage and kind (mean |s - s0| / |s0|, %), beside the released official scales' distance from
  theirs;
* ``budget.png``: target top-1 against HS epochs (mean ± std over seeds), ``init`` as a horizontal
  band (mean ± std).

Stage one's own top-1 ranks nothing here: the paper reports that it does not predict the target's.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from repopt.errors import RepOptError
from repopt.family import get_spec
from repopt.io import read_json, write_text
from repopt.plots import pyplot, save_png

from .compare import collect, distinct
from .compare.plots import mean_std_line
from .compare.stats import mean_std, welch
from .config import VARIANTS

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pipelines.ablation")
ORDER = ["plain", "repvgg", "qarepvgg", "searched", "reinit_only", "masks_only", "init", "ones", "channel_mean", "official_mean"]
SEED = "hs.seed"


def completed(dirs: list[Path]) -> pd.DataFrame:
    """The completed, distinct jobs of ``dirs`` (target top-1, variant, seed, HS epochs)."""
    frame = distinct(collect(dirs))
    frame = frame[frame["status"] == "completed"].copy()
    if SEED not in frame:
        frame[SEED] = 0
    frame[SEED] = pd.to_numeric(frame[SEED], errors="coerce").fillna(0).astype(int)
    return frame


def markdown(frame: pd.DataFrame) -> str:
    """A pipe table of ``frame`` (NaN as an empty cell)."""
    cells = [[("" if pd.isna(v) else str(v)) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def _row(name: str, values: pd.Series, seeds: pd.Series, references: dict[str, pd.Series]) -> dict:
    row = {
        "setting": name,
        "n": len(values),
        "top-1 (mean ± std)": mean_std(values),
        "per seed": ", ".join(f"{s}: {v:.2f}" for s, v in sorted(zip(seeds, values))),
    }
    for ref, ref_values in references.items():
        row[f"vs {ref}"] = "—" if name == ref else welch(values, ref_values).text()
    return row


def variant_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per variant of the ablation sweeps (one search budget), differences to plain and init."""

    def values(variant):
        rows = frame[frame["variant"] == variant]
        return rows["target_top1"].reset_index(drop=True), rows[SEED].reset_index(drop=True)

    references = {ref: values(ref)[0] for ref in ("plain", "init")}
    present = [v for v in ORDER if v in set(frame["variant"])] + sorted(set(frame["variant"]) - set(ORDER))
    return pd.DataFrame([_row(v, *values(v), references) for v in present])


def budget_frame(table: pd.DataFrame, budget: pd.DataFrame, default_epochs: int) -> pd.DataFrame:
    """``searched`` jobs of both sources with their HS epochs (the table's searches have ``default_epochs``)."""
    rows = pd.concat(
        [
            table[table["variant"] == "searched"].assign(**{"hs.epochs": table.get("hs.epochs", default_epochs)}),
            budget[budget["variant"] == "searched"],
        ],
        ignore_index=True,
    )
    rows["hs.epochs"] = pd.to_numeric(rows["hs.epochs"], errors="coerce").fillna(default_epochs).astype(int)
    rows[SEED] = rows[SEED].astype(int)
    return rows.drop_duplicates(subset=["hs.epochs", SEED], keep="last")


def budget_table(searched: pd.DataFrame, init: pd.Series) -> pd.DataFrame:
    rows = []
    for epochs, group in searched.groupby("hs.epochs"):
        rows.append(_row(f"searched, {epochs} HS epochs", group["target_top1"], group[SEED], {"init": init}))
    return pd.DataFrame(rows)


def plot_budget(searched: pd.DataFrame, init: pd.Series, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if len(init):
        mean, std = float(init.mean()), float(init.std(ddof=1)) if len(init) > 1 else 0.0
        ax.axhspan(mean - std, mean + std, color="tab:orange", alpha=0.2, label=f"init (no search), mean ± std, n={len(init)}")
        ax.axhline(mean, color="tab:orange")
    stats = mean_std_line(ax, searched, "hs.epochs", lambda counts: f"searched, mean ± std (n = {counts})", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(stats.index), [str(i) for i in stats.index])
    ax.set_xlabel("Hyper-Search epochs (log scale)")
    ax.set_ylabel("target test top-1 (%)")
    ax.set_title("Target top-1 against the search budget, init as a band", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def drift(scales: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Mean |s - s0| / |s0| (%) per stage and kind: how far a search moved the scales from where it started."""
    from hypersearch.export import parse_key  # the scales modules load torch: only once the arguments are parsed

    rows = []
    for key, value in scales.items():
        _, stage, kind = parse_key(key)
        rel = ((value - init[key]).abs() / init[key].abs()).mean().item() * 100
        rows.append({"stage": stage, "kind": kind, "drift %": rel})
    return pd.DataFrame(rows).groupby(["stage", "kind"], as_index=False)["drift %"].mean()


def search_drifts(dirs: list[Path]) -> pd.DataFrame:
    """The drift of every stage-one scales file below ``dirs`` (shared searches and per-job ones)."""
    from repopt.scales import SCALES_FILENAME, load_scales, read_metadata

    frames = []
    for path in sorted({p.resolve() for d in dirs for p in Path(d).rglob(SCALES_FILENAME)}):
        meta = read_metadata(path)
        arch = (
            get_spec(
                meta["arch"]["name"],
                meta["arch"].get("strides"),
                num_blocks=meta["arch"].get("num_blocks"),
                width_multiplier=meta["arch"].get("width_multiplier"),
            )
            if isinstance(meta.get("arch"), dict)
            else None
        )
        if arch is None:
            continue
        result = read_json(path.parent / "metrics.json") or {}
        frame = drift(load_scales(path, arch), arch.init_scales())
        frames.append(
            frame.assign(epochs=meta.get("epochs"), seed=meta.get("seed"), completed=result.get("status") == "completed")
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def official_drift(name: str = "B1") -> pd.DataFrame:
    from repopt.scales import load_scales

    spec = get_spec(name)
    return drift(load_scales(f"official:{name}", spec), spec.init_scales())


def report(table_dirs: list[Path], budget_dirs: list[Path], out: Path, default_epochs: int = 8) -> str:
    table, budget = completed(table_dirs), completed(budget_dirs) if budget_dirs else pd.DataFrame(columns=["variant"])
    out.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Ablation and search budget\n",
        "Completed jobs only; Welch 95 % intervals (`pipelines/compare/stats.py`); `*`: the interval excludes 0.\n",
        "## The variants\n",
        markdown(variant_table(table)),
        "",
    ]
    parts += ["Variants: " + "; ".join(f"`{v}`: {VARIANTS[v]}" for v in ORDER if v in set(table["variant"])) + ".\n"]
    init = table[table["variant"] == "init"]["target_top1"]
    searched = budget_frame(table, budget, default_epochs)
    if len(searched):
        parts += ["## The search budget\n", markdown(budget_table(searched, init)), ""]
        plot_budget(searched, init, out / "budget.png")
        parts += ["![target top-1 against HS epochs](budget.png)\n"]
    drifts = search_drifts(table_dirs + budget_dirs)
    if len(drifts):
        by = drifts[drifts["completed"]].pivot_table(index=["stage", "kind"], columns="epochs", values="drift %", aggfunc="mean")
        by.columns = [f"{c} HS epochs" for c in by.columns]
        by = by.join(official_drift().set_index(["stage", "kind"]).rename(columns={"drift %": "official B1 (240 epochs)"}))
        parts += [
            "## How far the searched scales moved from their init\n",
            "Mean |s - s0| / |s0| in %, per stage and branch kind, averaged over seeds.\n",
            markdown(by.round(2).reset_index()),
            "",
        ]
    text = "\n".join(parts) + "\n"
    write_text(out / "ablation.md", text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", nargs="+", type=Path, required=True, help="sweep directories of sweep=ablation_cpu")
    parser.add_argument("--budget", nargs="*", type=Path, default=[], help="sweep directories of sweep=hs_budget_cpu")
    parser.add_argument("--out", type=Path, required=True, help="where ablation.md and budget.png go")
    parser.add_argument("--default-epochs", type=int, default=8, help="HS epochs of the table's searches (the preset's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(report(args.table, args.budget, args.out, args.default_epochs))
    except (RepOptError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
