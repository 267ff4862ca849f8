"""``python -m pipelines.gpu_check``: one command that proves every CUDA path works and records the figures.

Parts, in order, under one time budget (``--budget``); each is recorded with its status, seconds,
error and figures, and a failing part does not stop the others:

1. ``env``        the card, driver, torch / CUDA / cuDNN / NCCL versions, missing packages;
2. ``tests``      ``pytest -m gpu`` (tests/test_gpu_paths.py): compiled HS with CUDA graphs vs eager,
                  bf16 + channels_last step, the device loader vs the CPU, compiled RepOptSGD, NCCL DDP,
                  SIGTERM + resume, export of a device-trained run;
3. ``benchmark``  ``python -m pipelines.benchmark`` with the device's defaults (B1 on CUDA);
4. ``hs_cifar10`` the paper HS on the shared CIFAR-10 (50,000 images, B1, batch 256, compile on) for 3
                  epochs: seconds per epoch after compilation (skipped when the data is absent);
5. ``target_224`` one 224 px B1 target epoch on a synthetic ImageFolder, RepOpt-VGG vs RepVGG.

Everything goes into ``--out``: ``report.json``, ``report.md``, each part's log and files, and
``results.tar.gz`` (the small files, to bring back as one). ``--device cpu --quick`` runs the same
commands at small sizes on a CPU (the gpu tests then run on the CPU too), a dry run of the script.

Examples::

    bash scripts/gpu_check.sh                                 # CUDA, full sizes, outputs/gpu_check/<date-time>/
    python -m pipelines.gpu_check --device cpu --quick --out /tmp/check
    python -m pipelines.gpu_check --device cuda --parts tests,benchmark --out /tmp/check
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from pipelines.check.parts import PARTS, CheckSettings
from pipelines.check.report import write_archive, write_report
from pipelines.check.runner import FAILED, run_parts

DEFAULT_BUDGET_S = {"cuda": 480, "cpu": 1500}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.gpu_check",
        description=(
            "Prove every CUDA path of the project works (pytest -m gpu) and record the performance figures "
            "(benchmark, paper HS on CIFAR-10, 224 px target epoch) into one folder: report.json, report.md, "
            "logs and results.tar.gz. A failing part is recorded and the rest still runs."
        ),
        epilog="Usual entry: bash scripts/gpu_check.sh (CUDA, outputs/gpu_check/<date-time>/). Dry run on a CPU: "
        "--device cpu --quick.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to run every part (default: cuda)")
    p.add_argument(
        "--quick", action="store_true", help="small sizes (tiny model, few images): the same commands, minutes on a 2-core CPU"
    )
    p.add_argument("--out", required=True, help="output folder (created; must be empty or absent)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for all parts together; a part is not started with under 20 s left "
        f"(default: {DEFAULT_BUDGET_S['cuda']} on cuda, {DEFAULT_BUDGET_S['cpu']} on cpu)",
    )
    p.add_argument(
        "--cifar10",
        default=None,
        help="the shared CIFAR-10 (cifar10-jpeg.tar.gz or its extracted folder); default: $REPOPT_CIFAR10, "
        "then shared/data/ in the checkout, then ../shared/data/ beside it",
    )
    p.add_argument(
        "--data-cache",
        default="~/.cache/repopt/bench",
        help="where the archive is extracted and the synthetic 224 px folder written, once (default: "
        "~/.cache/repopt/bench, the benchmark's cache)",
    )
    return p


def parse_parts(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise ValueError(f"--parts {text!r}: choose from {', '.join(PARTS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        names = parse_parts(args.parts)
    except ValueError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        print(f"gpu_check: error: {out} is not empty; choose a new --out folder (nothing was overwritten)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    settings = CheckSettings(
        device=args.device,
        quick=args.quick,
        out=out,
        data_cache=Path(os.path.expanduser(args.data_cache)),
        cifar10=Path(os.path.expanduser(args.cifar10)) if args.cifar10 else None,
    )
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET_S[args.device]
    meta = {
        "command": "python -m pipelines.gpu_check " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:])),
        "device": args.device,
        "quick": args.quick,
        "parts": names,
        "budget_s": budget,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "out": str(out),
    }
    t0 = time.monotonic()

    def progress(results) -> None:
        r = results[-1]
        meta["wall_seconds"] = time.monotonic() - t0
        write_report(out, meta, results)
        note = f"  {r.error.strip().splitlines()[0][:150]}" if r.error else ""
        print(f"gpu_check: {r.name:<11} {r.status.upper():<8} {r.seconds:7.1f} s{note}", file=sys.stderr, flush=True)

    parts = [PARTS[name](settings) for name in names]
    results = run_parts(parts, budget, on_result=progress)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    meta["wall_seconds"] = time.monotonic() - t0
    write_report(out, meta, results)
    archive = write_archive(out)
    print(
        f"gpu_check: {sum(r.status == FAILED for r in results)} of {len(results)} parts failed; "
        f"{meta['wall_seconds']:.0f} s; report {out / 'report.md'}, archive {archive}",
        file=sys.stderr,
    )
    return 1 if any(r.status == FAILED for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
