"""The quantization report: ``python -m pipelines.quant_report <sweep dirs> --out <dir>``.

For every completed pipeline job whose target run holds ``quant.json`` (PTQ, per-channel weights),
``quant-per_tensor.json`` (PTQ, per-tensor weights) and ``qat.json`` (quantization-aware training),
one row per variant (mean ± std over seeds): FP32, PTQ per channel, PTQ per tensor and QAT top-1;
each method's drop from FP32 with its Welch 95 % interval against the reference variant's drop
(``searched``: RepOpt-VGG); the folded kernels' spread (abs-max / std per layer, median over the
convs, and the widest layer's per-tensor weight std); and ONNX Runtime latency of the INT8 models.
Writes ``quantization.md`` into ``--out``. Jobs lacking one of the files are listed, not guessed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import mean, median

from repopt.io import read_json, write_text
from repopt.results import PER_TENSOR_TAG, QAT_RESULT, JobMetrics, QuantResult, Status, quant_name, read_result

from .compare.jobs import find_jobs
from .compare.stats import mean_std, welch
from .config import VARIANTS

ORDER = ["plain", "searched", "repvgg", "qarepvgg"]
RESULT_FILES = (quant_name(), quant_name(PER_TENSOR_TAG), QAT_RESULT)
METHODS = (("ptq_pc", "PTQ per channel"), ("ptq_pt", "PTQ per tensor"), ("qat", "QAT"))


def read_row(job: Path) -> dict | None:
    """One job's numbers, or None when it is not a completed job with all three quantization files."""
    if not (job / "target").is_dir():
        return None
    joined, target = read_result(job / "metrics.json", JobMetrics), job / "target"
    pc, pt = (read_result(target / quant_name(tag), QuantResult) for tag in ("", PER_TENSOR_TAG))
    qat = read_json(target / QAT_RESULT)
    if joined is None or joined.status != Status.COMPLETED or pc is None or pt is None or not isinstance(qat, dict):
        return None
    convs = [layer for layer in pc.layers if layer["kind"] != "linear"]
    return {
        "variant": joined.variant,
        "seed": (joined.config or {}).get("target", {}).get("seed"),
        "job": str(job),
        "fp32": pc.fp32_top1,
        "ptq_pc": pc.int8_top1,
        "ptq_pt": pt.int8_top1,
        "qat": qat["int8_top1"],
        "absmax_over_std": median(layer["absmax_over_std"] for layer in convs),
        "weight_std_max": max(layer["weight_std"] for layer in convs),
        "weight_absmax_max": max(layer["weight_absmax"] for layer in convs),
        "ms_fp32_b1": pc.latency_ms_per_image["fp32"]["batch1"],
        "ms_int8_b1": pc.latency_ms_per_image["int8"]["batch1"],
        "ms_int8_b32": pc.latency_ms_per_image["int8"]["batch32"],
    }


def collect(dirs: list[Path]) -> tuple[list[dict], list[str]]:
    rows, missing = [], []
    for root in dirs:
        for job in find_jobs(Path(root)):
            row = read_row(job)
            if row is not None:
                rows.append(row)
            elif any((job / "target" / name).is_file() for name in RESULT_FILES):
                missing.append(str(job))  # started on, not finished: say so (jobs never exported are not candidates)
    return rows, missing


def report(rows: list[dict], reference: str = "searched") -> str:
    by = {v: [r for r in rows if r["variant"] == v] for v in ORDER + sorted({r["variant"] for r in rows} - set(ORDER))}
    by = {v: rs for v, rs in by.items() if rs}
    drops = {v: {m: [r["fp32"] - r[m] for r in rs] for m, _ in METHODS} for v, rs in by.items()}
    lines = ["| variant | n | FP32 | PTQ per channel | PTQ per tensor | QAT |", "|---|---|---|---|---|---|"]
    for v, rs in by.items():
        lines.append(
            f"| {v} | {len(rs)} | {mean_std([r['fp32'] for r in rs])} | "
            + " | ".join(mean_std([r[m] for r in rs]) for m, _ in METHODS)
            + " |"
        )
    lines += [
        "",
        f"Drop from FP32 (points; mean ± std), and the difference of each variant's drop from {reference}'s "
        "(Welch 95 %; `*`: the interval excludes 0; positive: it loses more):",
        "",
        "| variant | " + " | ".join(f"{title} drop | vs {reference}" for _, title in METHODS) + " |",
        "|---|" + "---|---|" * len(METHODS),
    ]
    for v in by:
        cells = []
        for m, _ in METHODS:
            cells += [
                mean_std(drops[v][m]),
                "—" if v == reference or reference not in drops else welch(drops[v][m], drops[reference][m]).text(),
            ]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Folded kernels (per run, then mean over seeds): median over the convs of abs-max / std of the "
        "weights (how long-tailed a per-tensor grid is), the largest per-layer weight std and abs-max; ONNX "
        "Runtime latency per image (ms, one thread) of the FP32 and the PTQ INT8 model:",
        "",
        "| variant | abs-max / std (median) | max layer std | max layer abs-max | FP32 ms b1 | INT8 ms b1 | INT8 ms b32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, rs in by.items():
        lines.append(
            f"| {v} | "
            + " | ".join(
                f"{mean(r[k] for r in rs):.{p}f}"
                for k, p in (
                    ("absmax_over_std", 2),
                    ("weight_std_max", 3),
                    ("weight_absmax_max", 2),
                    ("ms_fp32_b1", 3),
                    ("ms_int8_b1", 3),
                    ("ms_int8_b32", 3),
                )
            )
            + " |"
        )
    lines += ["", "Per seed (FP32 / PTQ per channel / PTQ per tensor / QAT):", ""]
    for v, rs in by.items():
        lines.append(
            f"* `{v}`: "
            + "; ".join(
                f"seed {r['seed']}: {r['fp32']:.2f} / {r['ptq_pc']:.2f} / {r['ptq_pt']:.2f} / {r['qat']:.2f}"
                for r in sorted(rs, key=lambda r: r["seed"] or 0)
            )
        )
    lines += ["", "Variants: " + "; ".join(f"`{v}`: {VARIANTS[v]}" for v in by if v in VARIANTS) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.quant_report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "dirs", nargs="+", type=Path, help="sweep (or job) directories whose targets were exported and QAT-trained"
    )
    parser.add_argument("--out", type=Path, required=True, help="where quantization.md goes")
    parser.add_argument("--reference", default="searched", help="the variant whose drops the others are compared with")
    args = parser.parse_args(argv)
    rows, missing = collect(args.dirs)
    if not rows:
        print(
            f"error: no completed job with quant.json, quant-per_tensor.json and qat.json under "
            f"{', '.join(map(str, args.dirs))}; run python -m target_train.export / .qat on the targets first",
            file=sys.stderr,
        )
        return 1
    text = report(rows, args.reference)
    if missing:
        text += "\nLeft out (not completed, or a quantization file missing): " + ", ".join(missing) + "\n"
    write_text(args.out / "quantization.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
