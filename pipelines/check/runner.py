"""Run the parts of the device check one after another under one time budget, recording each.

A part that fails (an exception, a child process that exits non-zero or runs past its time) is
recorded with its status and error, and the next part still runs: one run on a GPU machine then brings
back everything that worked. Child processes run in their own process group, so a timeout ends the
whole tree (DataLoader workers, compile workers) and not only the parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
MIN_PART_SECONDS = 20.0  # a part is not started with less of the budget left


class Skip(Exception):
    """A part that cannot run here (its data is absent, the budget is spent): recorded as skipped."""


class PartFailed(Exception):
    """A part that ran and failed; ``figures`` keeps what it measured before failing."""

    def __init__(self, message: str, figures: dict | None = None):
        super().__init__(message)
        self.figures = figures or {}


@dataclass
class PartResult:
    name: str
    status: str
    seconds: float
    error: str | None = None
    figures: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Part:
    """``run(timeout_s) -> figures``; ``timeout_s`` is this part's limit, capped by the budget left."""

    name: str
    run: Callable[[float], dict]
    timeout_s: float


def run_parts(
    parts: Sequence[Part],
    budget_s: float,
    on_result: Callable[[list[PartResult]], None] = lambda r: None,
    clock: Callable[[], float] = time.monotonic,
) -> list[PartResult]:
    """Run ``parts`` in order; ``on_result`` sees the results so far after each part (to write the report)."""
    deadline = clock() + budget_s
    results: list[PartResult] = []
    for part in parts:
        left = deadline - clock()
        if left < MIN_PART_SECONDS:
            results.append(
                PartResult(
                    part.name,
                    SKIPPED,
                    0.0,
                    f"the time budget is spent ({budget_s:.0f} s, {max(left, 0):.0f} s left); "
                    f"raise --budget or run this part alone with --parts {part.name}",
                )
            )
            on_result(results)
            continue
        t0 = clock()
        try:
            figures = part.run(min(part.timeout_s, left))
            result = PartResult(part.name, OK, clock() - t0, figures=figures or {})
        except Skip as exc:
            result = PartResult(part.name, SKIPPED, clock() - t0, str(exc))
        except PartFailed as exc:
            result = PartResult(part.name, FAILED, clock() - t0, str(exc), exc.figures)
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others' results
            tail = traceback.format_exc().strip().splitlines()[-6:]
            result = PartResult(part.name, FAILED, clock() - t0, f"{type(exc).__name__}: {exc}\n" + "\n".join(tail))
        results.append(result)
        on_result(results)
    return results


def tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file (for an error message)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_logged(
    command: Sequence[str], log_path: Path, timeout_s: float, *, env: dict | None = None, cwd: Path | None = None
) -> float:
    """Run ``command`` with stdout and stderr in ``log_path``; return its wall seconds.

    Raises ``PartFailed`` naming the log's last lines when it exits non-zero or runs past
    ``timeout_s`` (then its whole process group is ended, SIGTERM first, SIGKILL after 10 s).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "wb") as out:
        out.write(("$ " + " ".join(map(str, command)) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(
            list(map(str, command)), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            raise PartFailed(
                f"timed out after {timeout_s:.0f} s: {' '.join(map(str, command[:4]))} ... "
                f"(log {log_path.name}):\n{tail(log_path)}"
            ) from None
        except BaseException:
            _end_group(proc)
            raise
    if rc != 0:
        raise PartFailed(f"exited {rc}: {' '.join(map(str, command[:4]))} ... (log {log_path.name}):\n{tail(log_path)}")
    return time.monotonic() - t0


def _end_group(proc: subprocess.Popen) -> None:
    """End the child's process group (it was started in its own session): SIGTERM, then SIGKILL for what is left."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
