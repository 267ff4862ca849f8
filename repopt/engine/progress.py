"""Progress within an epoch: a tqdm bar on a terminal, log lines everywhere else (``progress``).

``progress=auto`` (the default) draws a bar when stderr is a terminal and otherwise logs, so a CPU
run, a SLURM job or a CI log is never silent for a whole epoch: every ``progress_every_s`` seconds
one line with the step, the mean loss since the last line, images/s and the epoch's ETA.
``bar`` and ``log`` choose one; ``off`` shows nothing. Only rank 0 reports.
"""

from __future__ import annotations

import logging
import sys
import time

import torch
from tqdm import tqdm

log = logging.getLogger("repopt.progress")
MODES = ("auto", "bar", "log", "off")


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class EpochProgress:
    """One epoch's progress: ``advance(loss, images)`` after each step, ``close()`` at its end."""

    def __init__(self, mode: str, epoch: int, epochs: int, start: int, total: int, every_s: float, show: bool = True):
        mode = ("bar" if sys.stderr.isatty() else "log") if mode == "auto" else mode
        self.mode = mode if show else "off"
        self.epoch, self.epochs, self.step, self.total, self.every_s = epoch, epochs, start, total, every_s
        self._start = self._last = time.perf_counter()
        self._first_step = start
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = self._images = 0
        self._bar = (
            tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
            if self.mode == "bar"
            else None
        )

    def advance(self, loss: torch.Tensor, images: int) -> None:
        self.step += 1
        if self._bar is not None:
            self._bar.update(1)
            return
        if self.mode != "log":
            return
        detached = loss.detach().float()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._loss_count += 1
        self._images += images
        now = time.perf_counter()
        if now - self._last >= self.every_s and self.step < self.total:
            self.report(now)

    def report(self, now: float) -> None:
        """One line: where the epoch is, its recent loss and speed, and when it will end."""
        elapsed = now - self._start
        done = self.step - self._first_step
        eta = elapsed / max(done, 1) * (self.total - self.step)
        loss = float(self._loss_sum) / max(self._loss_count, 1) if self._loss_sum is not None else float("nan")
        log.info(
            "epoch %d/%d  step %d/%d  loss %.4f  %.0f img/s  ETA %s",
            self.epoch + 1,
            self.epochs,
            self.step,
            self.total,
            loss,
            self._images / max(now - self._last, 1e-9),
            _clock(eta),
        )
        self._last, self._loss_sum, self._loss_count, self._images = now, None, 0, 0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
