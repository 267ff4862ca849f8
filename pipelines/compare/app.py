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
  and the INT8 columns when ``quant.json`` exists (``quant-per_tensor.json``, ``qat.json``: the per-tensor
  and QAT INT8 columns), the pruning columns when a pruning result
  (``pruned/metrics.json``, or the folder ``--pruned`` names) exists; a line says how many
  duplicate jobs were left out;
* ``comparison.png`` (target accuracy per setting with HS accuracy beside it), ``scales.png``
  (mean |scale| per stage for each setting) and ``curves.png`` (target test top-1 per epoch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from repopt.config import LoggerConfig
from repopt.errors import ConfigError
from repopt.io import write_text
from repopt.tracking import log_files, require_backend, tracking_uri

from .jobs import collect, distinct, latest_sweep
from .plots import plot_comparison, plot_curves, plot_depth, plot_scales
from .stats import parse_baseline
from .table import (
    DELTA_METRICS,
    add_differences,
    aggregate,
    common_overrides,
    default_baseline,
    setting_keys,
    synthetic_banner,
    to_markdown,
)

COMPARISON_FILES = ("comparison.csv", "comparison.md", "comparison.png", "depth.png", "scales.png", "curves.png")


def compare(
    dirs: list[Path],
    out: Path | None = None,
    plots: bool = True,
    baseline: str | None = None,
    ignore: tuple[str, ...] = (),
    pruned: str = "pruned",
    delta_metric: str = "target_top1",
) -> pd.DataFrame:
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
    write_text(
        out / "comparison.md",
        to_markdown(
            table,
            keys or ["setting"],
            dirs,
            common_overrides(kept),
            delta_title,
            synthetic_banner(kept),
            delta_metric,
            len(frame) - len(kept),
        ),
    )
    if plots:
        plot_comparison(table, keys or ["setting"], out / "comparison.png")
        plot_scales(kept, keys, out / "scales.png")
        plot_curves(kept, keys, out / "curves.png")
        plot_depth(kept, out / "depth.png")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "dirs", nargs="+", type=Path, help="sweep directories (or single job directories); with --latest, roots of sweeps"
    )
    parser.add_argument(
        "--latest",
        action="store_true",
        help="compare only the sweep started last below each dir (the one whose multirun.yaml is newest), "
        "e.g. --latest outputs/search_and_train/multirun; --out then defaults to that sweep",
    )
    parser.add_argument("--out", type=Path, default=None, help="where to write the comparison files (default: the first dir)")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="KEY=VALUE",
        help="the reference setting of the differences (default: variant=plain when present); each setting "
        "is compared with the one that has the same other values and KEY=VALUE",
    )
    parser.add_argument(
        "--ignore",
        default="",
        metavar="KEYS",
        help="comma list of overrides that do not tell settings apart (e.g. export,quant.latency_runs "
        "when sweeps of the same settings were run with and without the export step)",
    )
    parser.add_argument(
        "--pruned",
        default="pruned",
        metavar="FOLDER",
        help="the pruning result folder in each target run (python -m target_train.prune out=FOLDER; "
        "default: pruned) whose accuracy, MACs and latency columns the table shows",
    )
    parser.add_argument(
        "--delta",
        default="target_top1",
        choices=DELTA_METRICS,
        metavar="METRIC",
        help="the column whose difference to the reference setting is shown: "
        + ", ".join(DELTA_METRICS)
        + " (default: target_top1)",
    )
    parser.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        default=None,
        metavar="URI",
        help="also log the comparison files to an MLflow run 'compare' in URI (default: "
        "sqlite:///<outputs>/mlflow.db, as logger=mlflow does)",
    )
    parser.add_argument("--experiment", default="repopt", help="the MLflow experiment of --mlflow (default: repopt)")
    args = parser.parse_args(argv)
    try:
        dirs = [latest_sweep(d) for d in args.dirs] if args.latest else args.dirs
        out = args.out or dirs[0]
        if args.mlflow is not None:
            require_backend("mlflow")
        table = compare(
            dirs,
            args.out,
            plots=not args.no_plots,
            baseline=args.baseline,
            ignore=tuple(k for k in args.ignore.split(",") if k),
            pruned=args.pruned,
            delta_metric=args.delta,
        )
        if args.mlflow is not None:
            store = LoggerConfig(name="mlflow", tracking_uri=args.mlflow or None, experiment=args.experiment)
            run_id = log_files(
                store,
                out,
                "compare",
                [out / name for name in COMPARISON_FILES],
                {"dirs": " ".join(map(str, dirs)), "baseline": args.baseline, "ignore": args.ignore},
            )
            print(f"logged the comparison files to MLflow run {run_id} ({tracking_uri(store, out)})")
    except (FileNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # --out is not writable (a file, a read-only or full disk): nothing was read wrongly
        print(
            f"error: cannot write the comparison into {out}: {exc.strerror or exc}; choose another folder with --out DIR",
            file=sys.stderr,
        )
        return 1
    print((out / "comparison.md").read_text())
    print(f"wrote {out / 'comparison.csv'}, {out / 'comparison.md'} and plots ({len(table)} settings)")
    return 0
