"""``python -m pipelines.compare``: the jobs of one or more sweeps side by side (``app``), read by
``jobs``, tabled by ``table``, with the intervals of ``stats`` and the figures of ``plots``."""

from .app import COMPARISON_FILES, compare, main
from .jobs import INCOMPLETE, METRIC_COLUMNS, ROW_COLUMNS, UNREADABLE, JobRow, collect, distinct, latest_sweep
from .table import DELTA_METRICS, add_differences, aggregate, to_markdown

__all__ = [
    "compare",
    "main",
    "COMPARISON_FILES",
    "JobRow",
    "ROW_COLUMNS",
    "METRIC_COLUMNS",
    "UNREADABLE",
    "INCOMPLETE",
    "collect",
    "distinct",
    "latest_sweep",
    "aggregate",
    "add_differences",
    "to_markdown",
    "DELTA_METRICS",
]
