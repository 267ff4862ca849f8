"""The project's performance targets (docs/design.md, "Performance") and the printed table."""

from __future__ import annotations

import math
from typing import Optional

# key, label, section, ratio key, comparison, threshold, needs CUDA, needs arch B1
TARGETS = (
    (
        "sgd_step_foreach",
        "RepOptSGD step / torch SGD step (foreach)",
        "opt",
        "repopt_sgd_over_sgd_foreach",
        "<=",
        1.3,
        False,
        True,
    ),
    (
        "sgd_step_default",
        "RepOptSGD default step / torch SGD step (fused)",
        "opt",
        "repopt_sgd_default_over_sgd_fused",
        "<=",
        1.3,
        False,
        True,
    ),
    (
        "loop_vs_repopt_foreach",
        "per-parameter loop / RepOptSGD (foreach)",
        "opt",
        "loop_over_repopt_sgd_foreach",
        ">=",
        5.0,
        False,
        True,
    ),
    (
        "loop_vs_repopt_fused",
        "per-parameter loop / RepOptSGD (fused)",
        "opt",
        "loop_over_repopt_sgd_fused",
        ">=",
        5.0,
        False,
        True,
    ),
    (
        "sgd_step_compiled",
        "RepOptSGD compiled step / torch SGD step (fused)",
        "opt",
        "repopt_sgd_compiled_over_sgd_fused",
        "<=",
        1.3,
        False,
        True,
    ),
    (
        "loop_vs_repopt_compiled",
        "per-parameter loop / RepOptSGD (compiled step)",
        "opt",
        "loop_over_repopt_sgd_compiled",
        ">=",
        5.0,
        False,
        True,
    ),
    ("train_img_s", "RepOpt-VGG img/s / RepVGG img/s", "train", "target_over_repvgg_img_s", ">=", 1.75, True, True),
    ("train_peak_mem", "RepOpt-VGG peak mem / RepVGG peak mem", "train", "target_over_repvgg_peak_mem", "<=", 0.8, True, True),
    ("loader_speed", "device loader / torchvision DataLoader", "loader", "device_over_dataloader", ">=", 5.0, True, False),
    ("hs_epoch_s", "HS epoch seconds per 50k images (best)", "hs_epoch", "best_s_per_50k", "<=", 1.5, True, True),
)

# targets that no step can reach on a device where this ratio (an unmasked step) already falls short
CEILINGS = {key: "loop_over_sgd_fused" for key in ("loop_vs_repopt_foreach", "loop_vs_repopt_fused", "loop_vs_repopt_compiled")}


def evaluate_targets(result: dict) -> list[dict]:
    """One entry per target: the measured value, the goal and PASS / FAIL / n/a with the reason."""
    sections = result["sections"]
    cuda = result["settings"]["device"].startswith("cuda")
    out = []
    for key, label, section, ratio, op, threshold, needs_cuda, needs_b1 in TARGETS:
        entry = {
            "key": key,
            "label": label,
            "section": section,
            "goal": f"{op} {threshold:g}",
            "value": None,
            "status": "n/a",
            "note": "",
        }
        sec = sections.get(section)
        if sec is None:
            entry["note"] = "section not run"
            out.append(entry)
            continue
        value = sec.get("ratios", {}).get(ratio)
        entry["value"] = value
        arch = sec.get("settings", {}).get("arch")
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            entry["note"] = "not measured"
        elif needs_cuda and not cuda:
            entry["note"] = "GPU target; measured here on CPU for reference"
        elif needs_b1 and arch != "B1":
            entry["note"] = f"target is defined on B1; this run used {arch}"
        else:
            ok = value <= threshold if op == "<=" else value >= threshold
            entry["status"] = "PASS" if ok else "FAIL"
            if not ok and key in CEILINGS:
                entry["note"] = _ceiling_note(sec, CEILINGS[key], threshold)
        out.append(entry)
    return out


def _ceiling_note(sec: dict, ceiling_key: str, threshold: float) -> str:
    """Why a loop-ratio target can fail for every implementation: torch's fused SGD, which skips the mask, is the ceiling."""
    ceiling = sec.get("ratios", {}).get(ceiling_key)
    if ceiling is None or ceiling >= threshold:
        return ""
    return f"unattainable on this device: even torch's fused SGD (no mask) is only {ceiling:.2f}x faster than the loop"


def _fmt(value: Optional[float], unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if unit in ("img/s",):
        return f"{value:,.0f}"
    if unit == "ms/step":
        return f"{value:.3f}"
    if unit == "s/epoch":
        return f"{value:.2f}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _row_detail(section: str, row: dict) -> str:
    if section == "opt":
        return f"min {row['ms_min']:.3f}  max {row['ms_max']:.3f} ms"
    if section == "train":
        mem = row.get("peak_mem_mib")
        return f"{row['ms']:.1f} ms/step  peak mem {'n/a' if mem is None else f'{mem:,.0f} MiB'}"
    if section == "loader":
        return f"{row['images']} images in {row['seconds']:.2f} s"
    if section == "hs_epoch":
        return (
            f"{row['images_per_s']:,.0f} img/s  {row['s_per_50k']:.1f} s per 50k  "
            f"warm-up{'/compile' if row.get('compile_mode') else ''} {row['warmup_s']:.1f} s ({row['warmup_steps']} steps)"
        )
    return ""


def format_table(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"RepOpt benchmark  {meta['date']}  device {meta['device_name']}  torch {meta['torch']}  "
        f"threads {meta['torch_threads']}  load {meta.get('load_average_start')} -> {meta.get('load_average_end')}  "
        f"others' CPU use {_pct(meta.get('other_cpu_busy_start'))} -> {_pct(meta.get('other_cpu_busy_end'))}",
    ]
    lines += [f"WARNING: {w}" for w in meta.get("warnings", [])]
    for name, sec in result["sections"].items():
        lines.append("")
        lines.append(f"== {name}: {sec['title']} ==")
        for row in sec["rows"]:
            lines.append(f"  {row['label']:<44} {_fmt(row['value'], row['unit']):>12} {row['unit']:<8} {_row_detail(name, row)}")
        for k, v in sec.get("ratios", {}).items():
            lines.append(f"  ratio {k:<42} {_fmt(v):>12}")
        for note in sec.get("notes", []):
            lines.append(f"  note: {note}")
    lines.append("")
    lines.append('== targets (docs/design.md, "Performance") ==')
    width = max((len(t["label"]) for t in result["targets"]), default=0)
    for t in result["targets"]:
        lines.append(f"  {t['label']:<{width}} {_fmt(t['value']):>8}  goal {t['goal']:<7} {t['status']:<5} {t['note']}")
    return "\n".join(lines)
