"""Differences between settings, with the uncertainty that seeds give them (Welch's t interval).

A sweep that repeats each setting over seeds gives, for a setting A and a reference setting B, the
difference of their mean target top-1 and a 95 % confidence interval that does not assume equal
variances (Welch's t-test as ``scipy.stats.ttest_ind(equal_var=False)`` computes it). There is no
interval, only the difference with its counts, when either side has fewer than two seeds or when
neither side varies at all (deterministic runs repeated): an interval of width zero would claim a
certainty that the runs do not give.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import pandas as pd
from scipy import stats

from repopt.errors import ConfigError


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with Welch's ``level`` interval (NaN bounds when either side has < 2 values
    or neither side has any spread)."""

    diff: float
    low: float
    high: float
    n_a: int
    n_b: int

    @property
    def excludes_zero(self) -> bool:
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)

    def text(self) -> str:
        """``+8.70 [5.10, 12.30] *`` (``*``: the interval excludes 0), ``+8.70 (n=1 vs 3)``, or
        ``+8.70 (no spread: n=2 vs 2)`` when both sides repeat one value."""
        if math.isnan(self.diff):
            return "—"
        if math.isnan(self.low):
            why = "no spread: " if self.n_a >= 2 and self.n_b >= 2 else ""
            return f"{self.diff:+.2f} ({why}n={self.n_a} vs {self.n_b})"
        return f"{self.diff:+.2f} [{self.low:+.2f}, {self.high:+.2f}]" + (" *" if self.excludes_zero else "")


def mean_std(values, with_n: bool = False) -> str:
    """``51.00 ± 1.41`` (sample std) over ``values``, `` (n=k)`` appended with ``with_n``; one value alone; ``—`` for none."""
    values = pd.Series(values, dtype=float)
    if values.empty:
        return "—"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    text = f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"
    return f"{text} (n={len(values)})" if with_n else text


def welch(a, b, level: float = 0.95) -> Difference:
    """The difference of means of ``a`` and ``b`` with Welch's t interval at ``level`` (scipy's)."""
    a, b = pd.Series(a, dtype=float).dropna(), pd.Series(b, dtype=float).dropna()
    n_a, n_b = len(a), len(b)
    if not n_a or not n_b:
        return Difference(math.nan, math.nan, math.nan, n_a, n_b)
    diff = float(a.mean() - b.mean())
    if n_a < 2 or n_b < 2 or (a.nunique() == 1 and b.nunique() == 1):
        return Difference(diff, math.nan, math.nan, n_a, n_b)
    with warnings.catch_warnings():  # one constant side is exact (variance 0), not a loss of precision
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence_level=level)
    return Difference(diff, float(interval.low), float(interval.high), n_a, n_b)


def as_settings(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``frame`` with its setting columns as text (missing: ""), so settings group and match exactly."""
    return frame.assign(**{k: frame[k].astype("string").fillna("") for k in keys})


def _natural(text: str) -> list:
    """Numbers in values sort as numbers: d6 before d28."""
    return [(0, int(piece), "") if piece.isdigit() else (1, 0, piece) for piece in re.split(r"(\d+)", text)]


def parse_baseline(text: str) -> tuple[str, str]:
    """``variant=plain`` -> ("variant", "plain")."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--baseline {text!r}: give KEY=VALUE, e.g. --baseline variant=plain")
    return key.strip(), value.strip()


def baseline_differences(
    frame: pd.DataFrame, keys: list[str], baseline: tuple[str, str], metric: str = "target_top1"
) -> dict[tuple, Difference]:
    """For each setting (the values of ``keys``), its difference to the reference setting: the one with
    the same values on every other key and ``baseline``'s value on its key (so at each depth,
    searched is compared with plain at that depth). Only completed jobs count."""
    key, value = baseline
    if key not in keys:
        raise ConfigError(f"--baseline {key}={value}: {key} is not a swept setting here (swept: {', '.join(keys) or 'none'})")
    frame = as_settings(frame, keys)
    values = sorted(set(frame[key]) - {""}, key=_natural)
    if value not in values:  # a misspelt value would otherwise give a table without differences
        raise ConfigError(f"--baseline {key}={value}: no job has {key}={value}; the values are: {', '.join(values)}")
    done = frame[frame["status"] == "completed"]
    groups = {k if isinstance(k, tuple) else (k,): g[metric] for k, g in done.groupby(keys, sort=False, dropna=False)}
    index = keys.index(key)
    out = {}
    for setting in {k if isinstance(k, tuple) else (k,) for k, _ in frame.groupby(keys, sort=False, dropna=False)}:
        reference = setting[:index] + (value,) + setting[index + 1 :]
        if setting != reference and reference in groups:
            out[setting] = welch(groups.get(setting, []), groups[reference])
    return out
