"""Stopping a run cleanly: stop signals become a flag checked at step boundaries, agreed on by every rank."""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

from .runtime import Runtime

log = logging.getLogger(__name__)


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked at step boundaries (a second SIGINT aborts)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handler(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received %s: stopping after the current step and writing last.pt", signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agree_on_stop(stop: "StopSignal", runtime: Runtime) -> None:
    """Under DDP, a stop signal seen by any rank stops every rank at the same step (or the collectives hang)."""
    if not runtime.distributed:
        return
    flag = torch.tensor([0.0 if stop.received is None else float(stop.received)], device=runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and stop.received is None:
        stop.received = int(flag.item())
