"""The device check's output: ``report.json`` (everything), ``report.md`` (the tables) and one archive.

The report is rewritten after every part, so a run stopped half-way still leaves what it measured.
``results.tar.gz`` holds the folder's small text files (no checkpoints, ONNX files or data), so the
whole result travels as one file.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Sequence

from repopt.io import write_text

from .runner import PartResult

ARCHIVED_SUFFIXES = (".json", ".md", ".csv", ".log", ".txt", ".xml")
ARCHIVE_NAME = "results.tar.gz"


def write_report(out: Path, meta: dict, results: Sequence[PartResult]) -> dict:
    """Write ``report.json`` and ``report.md`` into ``out``; returns the JSON document."""
    doc = {"meta": meta, "parts": [r.to_dict() for r in results]}
    write_text(out / "report.json", json.dumps(doc, indent=2, default=str) + "\n")
    write_text(out / "report.md", format_markdown(doc))
    return doc


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0][:160] if (text or "").strip() else ""


def format_markdown(doc: dict) -> str:
    meta, parts = doc["meta"], doc["parts"]
    env = next((p["figures"] for p in parts if p["name"] == "env"), {})
    lines = [
        f"# Device check, {meta.get('started', '')}",
        "",
        f"`{meta.get('command', '')}`: device {meta.get('device')}, {'quick' if meta.get('quick') else 'full'} "
        f"settings, {_fmt(meta.get('wall_seconds'))} s wall (budget {_fmt(meta.get('budget_s'))} s).",
        "",
    ]
    if env:
        lines += [
            f"Machine: {env.get('device_name', '?')}; driver {env.get('driver') or '—'}; torch {env.get('torch')} "
            f"(CUDA {env.get('torch_cuda') or '—'}, cuDNN {env.get('cudnn') or '—'}); Python {env.get('python')}; "
            f"{env.get('cpu_count')} CPU cores ({env.get('cpu_model')}).",
            "",
        ]
    lines += _table(
        ["part", "status", "seconds", "note"],
        [(p["name"], p["status"].upper(), p["seconds"], _first_line(p["error"])) for p in parts],
    )
    for p in parts:
        renderer = _SECTIONS.get(p["name"])
        if renderer and p["figures"]:
            lines += renderer(p["figures"])
    return "\n".join(lines).rstrip() + "\n"


def _tests_md(f: dict) -> list[str]:
    rows = [(t["name"], t["outcome"], t["seconds"], _first_line(t.get("message"))) for t in f.get("tests", [])]
    return [
        f"## `pytest -m gpu` ({f.get('passed', 0)} passed, {f.get('failed', 0)} failed, {f.get('skipped', 0)} skipped)",
        "",
    ] + _table(["test", "outcome", "seconds", "message"], rows)


def _benchmark_md(f: dict) -> list[str]:
    rows = [(t["label"], t.get("value"), t.get("goal"), t.get("status"), t.get("note", "")) for t in f.get("targets", [])]
    out = ["## `pipelines.benchmark`", ""] + _table(["target", "value", "goal", "verdict", "note"], rows)
    if f.get("table_file"):
        out += [f"Every section's figures: `{f['table_file']}` (and `benchmark.json`).", ""]
    return out


def _hs_md(f: dict) -> list[str]:
    rows = [(e["epoch"], e["epoch_seconds"], e["images_per_sec"], e["test_top1"]) for e in f.get("epochs", [])]
    return [
        f"## Paper HS on CIFAR-10 ({f.get('arch')}, {f.get('train_images')} images, batch {f.get('batch')}, "
        f"compile {f.get('compile')})",
        "",
        f"Seconds per epoch after compilation: **{_fmt(f.get('s_per_epoch_after_compile'))}** "
        f"(first epoch, with compilation: {_fmt(f.get('first_epoch_s'))} s); peak memory "
        f"{_fmt(f.get('peak_memory_gib'))} GiB.",
        "",
    ] + _table(["epoch", "train s", "img/s", "test top-1"], rows)


def _target_md(f: dict) -> list[str]:
    rows = [
        (m, r.get("images_per_sec"), r.get("epoch_seconds"), r.get("peak_memory_gib"), r.get("steps"))
        for m, r in f.get("models", {}).items()
    ]
    return [
        f"## Target training at {f.get('image_size')} px ({f.get('arch')}, synthetic ImageFolder, "
        f"{f.get('train_images')} images, batch {f.get('batch')})",
        "",
        f"RepOpt-VGG / RepVGG: images/s {_fmt(f.get('target_over_repvgg_img_s'))}, peak memory "
        f"{_fmt(f.get('target_over_repvgg_peak_mem'))} (the second epoch, with the worker DataLoader; "
        f"`pipelines.benchmark`'s train section times the model alone).",
        "",
    ] + _table(["model", "img/s", "epoch s", "peak GiB", "steps"], rows)


_SECTIONS = {"tests": _tests_md, "benchmark": _benchmark_md, "hs_cifar10": _hs_md, "target_224": _target_md}


def write_archive(out: Path) -> Path:
    """``out/results.tar.gz`` of the folder's small text files (the one file to bring back)."""
    target = out / ARCHIVE_NAME
    tmp = target.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if path.is_file() and path.suffix in ARCHIVED_SUFFIXES and path.stat().st_size <= 16 * 2**20:
                tar.add(path, arcname=str(Path(out.name) / path.relative_to(out)))
    tmp.replace(target)
    return target
