"""``python -m pipelines.benchmark`` (console script ``repopt-benchmark``): the performance figures.

Measures side by side, in one process, on one device:

1. ``opt``      one optimizer step on an architecture's parameters: RepOptSGD vs torch SGD (foreach,
                fused) vs a per-parameter Python loop; RepOptAdamW vs torch AdamW vs a loop;
2. ``train``    one training step of the RepOpt-VGG target (RepOptSGD), RepVGG (multi-branch, SGD)
                and the HS model (unfused / fused forward): images/s and peak memory;
3. ``loader``   the stage-one input pipeline: device loader vs torchvision DataLoader with workers;
4. ``hs_epoch`` one end-to-end Hyper-Search epoch on 32 px data: eager vs ``torch.compile``.

It prints a table with the ratios behind the project's performance targets (PASS / FAIL / n/a)
and writes the same as JSON (``--out``, or ``--json`` for stdout). What each section measures:
``docs/benchmarks.md`` and the modules of ``pipelines/bench``.

Examples::

    python -m pipelines.benchmark                          # CPU defaults: ~40 s on an idle 2-core machine
    python -m pipelines.benchmark --sections opt --arch B2
    python -m pipelines.benchmark --device cuda --out bench-gpu.json
    python -m pipelines.benchmark --data cifar10-jpeg:../shared/data/cifar10-jpeg.tar.gz --sections loader,hs_epoch
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from pipelines.bench.report import evaluate_targets, format_table
from pipelines.bench.settings import SECTIONS, Settings
from repopt.errors import ConfigError
from repopt.io import write_text
from repopt.vgg.arch import arch_names, get_arch

log = logging.getLogger("repopt.benchmark")

# (CPU default, CUDA default) of every device-dependent option
DEFAULTS = {
    "opt_arch": ("B1", "B1"),
    "train_arch": ("A0s", "B1"),
    "hs_arch": ("A0s", "B1"),
    "resolution": (64, 224),
    "batch": (32, 128),
    "steps": (10, 30),
    "warmup": (2, 10),
    "hs_images": (2048, 50_000),
    "hs_batch": (256, 256),
    "loader_epochs": (2, 2),
    "workers": (2, 8),
    "compile": (False, True),
    "compile_modes": ("default", "reduce-overhead"),  # what compile_mode=auto picks for HS on one GPU
    "amp": (False, True),
    "channels_last": (False, True),
}


def _defaults_help(key: str) -> str:
    cpu, cuda = DEFAULTS[key]
    return f"default: {cpu} on CPU, {cuda} on CUDA"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="repopt-benchmark",
        description=(
            "Measure RepOptimizer performance side by side in one process: optimizer step (opt), training "
            "step (train), stage-one input pipeline (loader) and one Hyper-Search epoch (hs_epoch). Prints a "
            "table with the ratios of the project's performance targets marked PASS/FAIL/n/a."
        ),
        epilog=(
            "Defaults depend on the device (the CPU defaults take about 40 s on an idle 2-core machine; "
            "check the load first, other processes on the cores make CPU timings meaningless). "
            "GPU run: python -m pipelines.benchmark --device cuda --out bench-gpu.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    g.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)"
    )
    g.add_argument(
        "--arch",
        default=None,
        choices=arch_names(),
        help="architecture of every section (overrides the per-section defaults below)",
    )
    g.add_argument(
        "--opt-arch", default=None, choices=arch_names(), help="opt section architecture; " + _defaults_help("opt_arch")
    )
    g.add_argument(
        "--train-arch", default=None, choices=arch_names(), help="train section architecture; " + _defaults_help("train_arch")
    )
    g.add_argument(
        "--hs-arch", default=None, choices=arch_names(), help="hs_epoch section architecture; " + _defaults_help("hs_arch")
    )
    g.add_argument("--num-classes", type=int, default=1000, help="classifier width of the opt and train sections (default: 1000)")

    g = p.add_argument_group("sizes and repeats")
    g.add_argument("--resolution", type=int, default=None, help="train section input size in px; " + _defaults_help("resolution"))
    g.add_argument("--batch", type=int, default=None, help="train section batch size; " + _defaults_help("batch"))
    g.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per variant in the opt and train sections (the median is reported); " + _defaults_help("steps"),
    )
    g.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps before timing (opt, train; hs_epoch warm-up steps); " + _defaults_help("warmup"),
    )
    g.add_argument(
        "--hs-images",
        type=int,
        default=None,
        help="training images (32 px) of the loader and hs_epoch sections; " + _defaults_help("hs_images"),
    )
    g.add_argument(
        "--hs-batch", type=int, default=None, help="batch size of the loader and hs_epoch sections; " + _defaults_help("hs_batch")
    )
    g.add_argument("--loader-epochs", type=int, default=None, help="timed epochs per loader; " + _defaults_help("loader_epochs"))
    g.add_argument(
        "--workers", type=int, default=None, help="DataLoader worker processes (loader section); " + _defaults_help("workers")
    )

    g = p.add_argument_group("execution")
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the HS epoch under torch.compile; " + _defaults_help("compile"),
    )
    g.add_argument(
        "--compile-modes",
        default=None,
        help="comma-separated torch.compile modes ('default' = no mode); " + _defaults_help("compile_modes"),
    )
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast in the train and hs_epoch sections; " + _defaults_help("amp"),
    )
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format in the train and hs_epoch sections; " + _defaults_help("channels_last"),
    )
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    g.add_argument("--seed", type=int, default=0, help="model init, scales and data order (default: 0)")

    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="synthetic",
        help="synthetic | cifar10-jpeg:<path to cifar10-jpeg.tar.gz or its extracted folder> (loader, hs_epoch; default: synthetic)",
    )
    g.add_argument(
        "--data-cache",
        default="~/.cache/repopt/bench",
        help="where an archive given to --data is extracted and its decoded images cached (reused; default: ~/.cache/repopt/bench)",
    )

    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="write the results as JSON to this file")
    g.add_argument("--json", action="store_true", help="print the JSON to stdout (the table then goes to stderr)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def resolve_settings(args: argparse.Namespace) -> Settings:
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ConfigError(f"--sections {args.sections!r}: choose from {', '.join(SECTIONS)}")
    # the sections' modules load torch: only once the arguments are parsed (a typo is reported at once)
    from pipelines.bench.data import parse_data
    from repopt.engine.runtime import resolve_device

    device = resolve_device(args.device)
    idx = 1 if device.type == "cuda" else 0

    def pick(name):
        value = getattr(args, name)
        return DEFAULTS[name][idx] if value is None else value

    parse_data(args.data)
    settings = Settings(
        device=device,
        sections=sections,
        opt_arch=args.opt_arch or args.arch or DEFAULTS["opt_arch"][idx],
        train_arch=args.train_arch or args.arch or DEFAULTS["train_arch"][idx],
        hs_arch=args.hs_arch or args.arch or DEFAULTS["hs_arch"][idx],
        resolution=pick("resolution"),
        batch=pick("batch"),
        steps=pick("steps"),
        warmup=pick("warmup"),
        num_classes=args.num_classes,
        hs_images=pick("hs_images"),
        hs_batch=pick("hs_batch"),
        loader_epochs=pick("loader_epochs"),
        workers=pick("workers"),
        compile=pick("compile"),
        compile_modes=tuple(m.strip() for m in pick("compile_modes").split(",") if m.strip()),
        data=args.data,
        data_cache=args.data_cache,
        amp=pick("amp"),
        channels_last=pick("channels_last"),
        seed=args.seed,
    )
    for name in ("resolution", "batch", "steps", "hs_images", "hs_batch", "loader_epochs", "num_classes"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive (got {getattr(settings, name)})")
    if settings.warmup < 0 or settings.workers < 0:
        raise ConfigError("--warmup and --workers must be >= 0")
    if settings.hs_images < settings.hs_batch and {"loader", "hs_epoch"} & set(sections):
        raise ConfigError(
            f"--hs-images {settings.hs_images} is smaller than --hs-batch {settings.hs_batch}: "
            f"with drop_last there would be no batch at all"
        )
    for name in {settings.opt_arch, settings.train_arch, settings.hs_arch}:
        get_arch(name)
    if settings.amp and device.type != "cuda":
        log.warning("--amp on %s: bf16 autocast on the CPU is usually slower than fp32", device.type)
    return settings


def busy_warnings(meta: dict, settings: Settings) -> list[str]:
    """A warning when other processes kept the CPU busy around the run (CPU figures then mislead)."""
    busy = [b for b in (meta.get("other_cpu_busy_start"), meta.get("other_cpu_busy_end")) if b is not None]
    if settings.device.type != "cpu" or not busy or max(busy) < 0.25:
        return []
    head = f"other processes kept {100 * max(busy):.0f}% of the {meta['cpu_count']} cores busy around this run: "
    if meta["torch_threads"] > 1:
        return [
            head + f"CPU timings with {meta['torch_threads']} threads are unreliable (parallel regions wait for "
            f"descheduled threads); rerun on an idle machine, or with --threads 1 to compare like with like"
        ]
    return [head + "CPU timings are slowed and noisy (time-shared cores); rerun on an idle machine for absolute figures"]


def run_benchmark(settings: Settings) -> dict:
    """Run the requested sections and return the result (meta, settings, sections, targets)."""
    from pipelines.bench import hs_epoch, loader, opt_step, train_step
    from pipelines.bench.data import DataSources
    from pipelines.bench.machine import cpu_busy_fraction, load_average, machine_info

    result = {"meta": machine_info(settings.device), "settings": settings.to_dict(), "sections": {}}
    sources = DataSources(settings)
    t0 = time.perf_counter()
    runners = {
        "opt": lambda: opt_step.run(settings),
        "train": lambda: train_step.run(settings),
        "loader": lambda: loader.run(settings, sources),
        "hs_epoch": lambda: hs_epoch.run(settings, sources),
    }
    for name in SECTIONS:
        if name in settings.sections:
            t = time.perf_counter()
            log.info("section %s ...", name)
            result["sections"][name] = runners[name]()
            result["sections"][name]["section_seconds"] = time.perf_counter() - t
    result["meta"]["total_seconds"] = time.perf_counter() - t0
    result["meta"]["load_average_end"] = load_average()
    result["meta"]["other_cpu_busy_end"] = cpu_busy_fraction()
    result["meta"]["warnings"] = busy_warnings(result["meta"], settings)
    result["targets"] = evaluate_targets(result)
    return result


@contextlib.contextmanager
def _progress_logging(quiet: bool):
    """Progress lines of the benchmark and of the data loading it calls, on stderr, for this call only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = []
    for name in ("repopt.benchmark", "repopt.data"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(logging.WARNING if quiet else logging.INFO)
        logger.propagate = False
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _progress_logging(args.quiet):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        settings = resolve_settings(args)
    except (ConfigError, ValueError) as exc:
        print(f"repopt-benchmark: error: {exc}", file=sys.stderr)
        return 2
    result = run_benchmark(settings)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        out = Path(args.out).expanduser()
        write_text(out, text + "\n")
        log.info("results written to %s", out)
    table = format_table(result)
    if args.json:
        print(table, file=sys.stderr)
        print(text)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
