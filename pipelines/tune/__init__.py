"""``python -m pipelines.tune``: Optuna studies whose trials are pipeline jobs (``app``), claimed by any
number of workers (``claim``), built from ``config`` (``storage``), run one by one (``trial``) and
reported (``report``)."""

from .app import main, run_study
from .claim import ClaimLock, advisory_key

__all__ = ["main", "run_study", "ClaimLock", "advisory_key"]
