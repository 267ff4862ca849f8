"""Named fault points, for the fault-injection tests (tests/faults/) and for trying faults by hand.

``REPOPT_FAULT=<point>[@<n>][:<action>]`` makes the ``n``-th time (default: the first) this process
passes ``fault_point(<point>)`` do ``action``:

* ``kill`` (default): SIGKILL to itself — the process dies there, no handler and no cleanup run;
* ``term``: SIGTERM to itself — whatever handler is installed at that point decides;
* ``enospc``: raise ``OSError(ENOSPC)``, as a full disk does.

The points: ``train.end`` (a stage's training finished, its artifacts not yet written),
``best.before_last`` (``best.pt`` written, ``last.pt`` not yet), ``job.between_stages`` (the pipeline,
stage one done, stage two not started) and ``write:<file name>`` (inside every atomic write, after
the temporary file is complete and before it is renamed into place, e.g. ``write:deploy.pt``).
Unset, a fault point costs one dictionary look-up.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "REPOPT_FAULT"
ACTIONS = ("kill", "term", "enospc")
_passes: dict[str, int] = {}


def parse(spec: str) -> tuple[str, int, str]:
    """``"write:last.pt@2:kill"`` -> ("write:last.pt", 2, "kill")."""
    point, action = spec, "kill"
    if spec.rsplit(":", 1)[-1] in ACTIONS:
        point, action = spec.rsplit(":", 1)
    point, _, nth = point.partition("@")
    return point, int(nth or 1), action


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, nth, action = parse(spec)
    if point != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
