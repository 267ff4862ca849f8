"""How fast a mistyped command is refused: every app with a misspelt key, group or value, timed beside
``python -c "import torch"`` on the same machine.

Each app checks its settings before torch loads (the entry modules import only the schemas; the
training code is imported once the config is valid), so a typo costs a fraction of torch's own import.
The table prints the median wall time of each bad command, its ratio to the import of torch measured
in the same run, and whether torch was imported before the error (``-X importtime``).

    python -m pipelines.bench.cli_latency [--repeats 3] [--target 2.0] [--only hypersearch ...]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TORCH_IMPORT = re.compile(r"^import time:.*\|\s*torch$", re.MULTILINE)  # torch itself, at any nesting depth


@dataclass(frozen=True)
class BadCommand:
    """One mistyped command: ``python -m <module> <args>``, the exit code and a fragment of its error."""

    module: str
    args: tuple[str, ...]
    what: str  # key | group | value | option
    says: str
    exit_code: int = 1

    @property
    def command(self) -> str:
        return " ".join(("python -m", self.module, *self.args))


CASES: tuple[BadCommand, ...] = (
    BadCommand("hypersearch", ("optim.lrr=1",), "key", "Key 'lrr' not in 'OptimConfig'"),
    BadCommand("hypersearch", ("optim=sgdd",), "group", "Could not find 'optim/sgdd'"),
    BadCommand("hypersearch", ("optim.name=sgdd",), "value", "error: optim.name='sgdd': must be one of sgd, adamw"),
    BadCommand("target_train", ("scales_form=model",), "key", "Key 'scales_form' not in 'TargetConfig'"),
    BadCommand("target_train", ("data=cifar1000",), "group", "Could not find 'data/cifar1000'"),
    BadCommand("target_train", ("model=foo",), "value", "error: model='foo': must be one of target"),
    BadCommand("pipelines.search_and_train", ("hs.optim.lrr=1",), "key", "Key 'lrr' not in 'OptimConfig'"),
    BadCommand("pipelines.search_and_train", ("variant=serched",), "value", "error: variant='serched': must be one of"),
    BadCommand("target_train.export", ("run=.", "checkpoitn=best"), "key", "Key 'checkpoitn' not in 'ExportConfig'"),
    BadCommand("target_train.export", ("run=.", "calibration_method=minmaxx"), "value", "calibration_method='minmaxx'"),
    BadCommand("target_train.prune", ("run=.", "importance=l3"), "value", "error: importance='l3': must be one of l2"),
    BadCommand("target_train.qat", ("run=.", "epochs=-1"), "value", "error: epochs must be >= 0"),
    BadCommand("pipelines.tune", ("tune=quickstart", "n_trialz=3"), "key", "Key 'n_trialz' not in 'TuneConfig'"),
    BadCommand("pipelines.tune", ("tune=quikstart",), "group", "Could not find 'tune/quikstart'"),
    BadCommand("pipelines.tune", ("tune=quickstart", "sampler.name=foo"), "value", "error: sampler.name='foo'"),
    BadCommand("pipelines.compare", ("--sweeep", "x"), "option", "unrecognized arguments: --sweeep", exit_code=2),
    BadCommand(
        "pipelines.ablation",
        ("--table", "x", "--out", "y", "--defualt-epochs", "3"),
        "option",
        "unrecognized arguments: --defualt-epochs",
        exit_code=2,
    ),
    BadCommand(
        "pipelines.quant_report",
        ("x", "--out", "y", "--refrence", "z"),
        "option",
        "unrecognized arguments: --refrence",
        exit_code=2,
    ),
    BadCommand("target_train.verify", ("--arch", "tinyy"), "value", "--arch tinyy: unknown architecture 'tinyy'", exit_code=2),
    BadCommand(
        "target_train.verify",
        ("--optimizers", "sgd,adamww"),
        "value",
        "--optimizers 'sgd,adamww': a comma list of sgd, adamw",
        exit_code=2,
    ),
    BadCommand("pipelines.benchmark", ("--sections", "opt,tran"), "value", "--sections 'opt,tran': choose from", exit_code=2),
)


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stderr: str
    seconds: float

    @property
    def torch_loaded(self) -> bool:
        return TORCH_IMPORT.search(self.stderr) is not None


def child_env() -> dict[str, str]:
    """The environment of a timed command: this checkout first on the path, no colour, no full Hydra tracebacks."""
    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    return env


def run(argv: list[str], cwd: Path, importtime: bool = False) -> Outcome:
    """Run ``python [-X importtime] <argv>`` in ``cwd`` (where a refused run may leave its record)."""
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=300)
    return Outcome(proc.returncode, proc.stderr + proc.stdout, time.perf_counter() - t0)


def run_case(case: BadCommand, cwd: Path, importtime: bool = False) -> Outcome:
    return run(["-m", case.module, *case.args], cwd, importtime)


def measure(repeats: int, cwd: Path, cases: tuple[BadCommand, ...] = CASES) -> tuple[float, list[tuple[BadCommand, float, bool]]]:
    """The median seconds of ``import torch`` and of each case (plus whether it imported torch)."""
    torch_s = statistics.median(run(["-c", "import torch"], cwd).seconds for _ in range(repeats))
    rows = []
    for case in cases:
        rows.append(
            (case, statistics.median(run_case(case, cwd).seconds for _ in range(repeats)), run_case(case, cwd, True).torch_loaded)
        )
    return torch_s, rows


def format_table(torch_s: float, rows: list[tuple[BadCommand, float, bool]], target: float) -> str:
    width = max(len(case.command) for case, _, _ in rows)
    lines = [
        f"import torch alone: {torch_s:.2f} s (median)",
        f"{'command':<{width}}  {'what':<6}  {'seconds':>7}  {'/ torch':>7}  {'torch?':>6}  < {target:g} s",
    ]
    for case, seconds, loaded in rows:
        verdict = "PASS" if seconds < target and not loaded else "FAIL"
        lines.append(
            f"{case.command:<{width}}  {case.what:<6}  {seconds:7.2f}  {seconds / torch_s:7.2f}  {'yes' if loaded else 'no':>6}  {verdict}"
        )
    worst = max(seconds for _, seconds, _ in rows)
    lines.append(f"slowest {worst:.2f} s = {worst / torch_s:.2f} x import torch")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.bench.cli_latency",
        description="Time every app's refusal of a misspelt key, group or value beside the import of torch, "
        "and check that none imports torch before its error.",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per command; the median is printed (default: 3)")
    parser.add_argument("--target", type=float, default=2.0, help="seconds a refusal may take (default: 2.0)")
    modules = sorted({case.module for case in CASES})
    parser.add_argument("--only", nargs="+", choices=modules, metavar="MODULE", help="these apps only: " + ", ".join(modules))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be at least 1")
    cases = tuple(case for case in CASES if args.only is None or case.module in args.only)
    with tempfile.TemporaryDirectory(prefix="repopt-cli-latency-") as cwd:
        torch_s, rows = measure(args.repeats, Path(cwd), cases)
    print(format_table(torch_s, rows, args.target))
    return 0 if all(seconds < args.target and not loaded for _, seconds, loaded in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
