"""Hooks into a running training loop, for code that drives an app from outside (tests, search drivers).

A ``Callback`` sees the trainer after every step and after every finished epoch (once the
epoch's checkpoint and history are written). The apps pass their own callbacks (the tracker)
explicitly: ``Trainer(..., callbacks=[...])``, through ``make_trainer``. Code that drives an app
from outside, without a way into its arguments (tests, the Optuna pruner, the sweep guard's stop
watch), attaches callbacks to every trainer created inside a block with ``active(...)``::

    with active(MyCallback()):
        python_app_main()          # every Trainer created inside calls MyCallback
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class Callback:
    """Override what you need; the trainer calls both on every rank."""

    def on_step_end(self, trainer) -> None:
        """After an optimizer step; ``trainer.state.global_step`` counts it. ``trainer.request_stop``
        ends the run at this step boundary as a stop signal would."""

    def on_epoch_end(self, trainer, row: dict) -> None:
        """After an epoch: ``row`` is its ``history.csv`` row; ``last.pt`` holds the epoch's end."""


_ACTIVE: list[Callback] = []


@contextlib.contextmanager
def active(*callbacks: Callback) -> Iterator[None]:
    """Attach ``callbacks`` to every trainer created inside the block."""
    _ACTIVE.extend(callbacks)
    try:
        yield
    finally:
        for cb in callbacks:
            _ACTIVE.remove(cb)


def registered() -> list[Callback]:
    """The callbacks attached with ``active`` right now (a trainer takes them when it is created)."""
    return list(_ACTIVE)
