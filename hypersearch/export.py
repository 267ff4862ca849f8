"""Writing the stage-one results: the scales file with provenance, and a per-stage summary."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from repopt.family import get_family
from repopt.io import write_text
from repopt.plots import pyplot, save_png
from repopt.scales import SCALES_FILENAME, ScalesFile, parse_scale_key, save_scales

log = logging.getLogger(__name__)


def parse_key(key: str) -> tuple[str, int, str]:
    """``(block, stage, kind)`` of a scale key: the stage is VGG's ``stageN`` or GhostNet's group ``blocks.G`` (-1: neither)."""
    parsed = parse_scale_key(key)
    if parsed is None:
        return key.rsplit(".", 1)[0], -1, "scale"
    family, block, kind = parsed
    stage = get_family(family).stage_of_block.match(block)
    return block, int(stage[1]) if stage else -1, kind


def abs_scales_by_stage(scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every |s| value of each stage in one float32 CPU vector, as ``{"stage0": ..., "stage1": ...}`` in stage order."""
    groups: dict[int, list[torch.Tensor]] = {}
    for key, value in scales.items():
        groups.setdefault(parse_key(key)[1], []).append(value.detach().abs().flatten().to("cpu", torch.float32))
    return {f"stage{stage}": torch.cat(values) for stage, values in sorted(groups.items())}


def scales_summary(scales: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One row per scale vector: block, stage (VGG stage, GhostNet group), kind and the statistics of its values."""
    rows = []
    for key, value in scales.items():
        block, stage, kind = parse_key(key)
        rows.append(
            {
                "key": key,
                "block": block,
                "stage": stage,
                "kind": kind,
                "mean": float(value.mean()),
                "std": float(value.std()) if value.numel() > 1 else 0.0,
                "min": float(value.min()),
                "max": float(value.max()),
                "abs_mean": float(value.abs().mean()),
                "negative_fraction": float((value < 0).float().mean()),
            }
        )
    return pd.DataFrame(rows)


def plot_scales(summary: pd.DataFrame, path: Path, title: str = "") -> None:
    """Mean |scale| per block for each branch kind, blocks in network order."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    order = list(dict.fromkeys(summary["block"]))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]  # kinds often coincide: tell them apart by shape too
    for (kind, group), (marker, line) in zip(summary.groupby("kind"), styles * 4):
        xs = [order.index(b) for b in group["block"]]
        ax.plot(xs, group["abs_mean"], marker=marker, linestyle=line, ms=4, label=kind)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.set_xlabel("block (network order)")
    ax.set_ylabel("mean |scale|")
    ax.set_title(title or "learned scales")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def export_scales(run_dir: Path, scales: dict[str, torch.Tensor], metadata: dict) -> ScalesFile:
    """``scales.safetensors`` + ``scales.csv`` + ``scales.png`` in the run directory; returns the file written."""
    written = save_scales(run_dir / SCALES_FILENAME, scales, metadata)
    summary = scales_summary(scales)
    write_text(run_dir / "scales.csv", summary.to_csv(index=False))
    try:
        plot_scales(summary, run_dir / "scales.png", f"{metadata.get('arch', {}).get('name', '')} learned scales")
    except Exception as exc:  # a plot is a convenience; never lose the scales over it
        log.warning("could not draw scales.png: %s", exc)
    return written
