"""Whether a cluster scheduler started this job again (then it continues its own run by itself), and
whether the stop signal a job got is its scheduler requeueing it (then a sweep job leaves no result).

A pre-empted or timed-out SLURM job is requeued and runs its command again, from the top, in the
run directory that already holds its ``last.pt``. Without this, that command would be refused
(``resume=true`` is needed to continue a run; repopt/setup.py), so every job on a cluster would have
to be submitted with ``resume=true``, which also makes a typo'd directory silently continue someone
else's run. Only the restart is trusted here; the run must still be the same work (repopt/rundir.py,
``check_same_work``; the trainer's checkpoint checks).
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Mapping


def restarted_by_scheduler(environ: Mapping[str, str] | None = None) -> bool:
    """True in a SLURM job that SLURM has started again (``SLURM_RESTART_COUNT`` > 0, ``SLURM_JOB_ID`` set).

    SLURM counts the restarts of a batch job in ``SLURM_RESTART_COUNT``: unset on its first run, 1, 2,
    ... after each requeue, with the same ``SLURM_JOB_ID``. Every way a job comes back goes through
    that requeue: ``scontrol requeue``, pre-emption with ``PreemptMode=REQUEUE``, a failed node, and
    submitit's own requeue on timeout or pre-emption (hydra-submitit-launcher's ``checkpoint`` hands
    submitit the same call; submitit runs ``scontrol requeue <SLURM_JOB_ID>``, so the array task keeps
    its job id and ``SLURM_RESTART_COUNT`` reaches the task through ``srun``). A fresh ``sbatch`` of
    the same script, or a command typed at a shell, has no restart count and is refused as before.
    """
    env = os.environ if environ is None else environ
    if not env.get("SLURM_JOB_ID"):
        return False
    try:
        return int(env.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def being_requeued(environ: Mapping[str, str] | None = None, timeout_s: float = 10.0) -> bool:
    """True when SLURM is requeueing this job now: the SIGTERM it got is a requeue (``scontrol requeue``,
    pre-emption), not a cancel, and the job will run again.

    A sweep job that returns an ``interrupted`` result ends its sweep (hydra-submitit-launcher hands
    the result back and stops waiting) although SLURM runs the job again; such a job must leave no
    result, so the launcher waits for its next run. SLURM counts the restart when it requeues, before
    the job's processes get SIGTERM: ``scontrol show job`` then reports ``Restarts`` above this run's
    ``SLURM_RESTART_COUNT``; ``scancel`` leaves it as it was. False outside a SLURM job, or when
    ``scontrol`` does not answer within ``timeout_s``.
    """
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return False
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=timeout_s)
        mine = int(env.get("SLURM_RESTART_COUNT", "0"))
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return False
    found = re.search(r"\bRestarts=(\d+)", out.stdout)
    return out.returncode == 0 and found is not None and int(found.group(1)) > mine
