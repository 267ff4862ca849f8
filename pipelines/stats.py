"""Differences between settings, with the uncertainty that seeds give them (Welch's t interval).

A sweep that repeats each setting over seeds gives, for a setting A and a reference setting B, the
difference of their mean target top-1 and a 95 % confidence interval that does not assume equal
variances (Welch). With fewer than two seeds on either side there is no interval: the difference
is reported with its counts only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from scipy import stats

from repopt.errors import ConfigError


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with Welch's ``level`` interval (NaN bounds when either side has < 2 values)."""

    diff: float
    low: float
    high: float
    n_a: int
    n_b: int

    @property
    def excludes_zero(self) -> bool:
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)

    def text(self) -> str:
        """``+8.70 [5.10, 12.30] *`` (``*``: the interval excludes 0), or ``+8.70 (n=1 vs 3)``."""
        if math.isnan(self.diff):
            return "—"
        if math.isnan(self.low):
            return f"{self.diff:+.2f} (n={self.n_a} vs {self.n_b})"
        return f"{self.diff:+.2f} [{self.low:+.2f}, {self.high:+.2f}]" + (" *" if self.excludes_zero else "")


def welch(a, b, level: float = 0.95) -> Difference:
    """The difference of means of ``a`` and ``b`` with Welch's t interval at ``level``."""
    a, b = pd.Series(a, dtype=float).dropna(), pd.Series(b, dtype=float).dropna()
    n_a, n_b = len(a), len(b)
    if not n_a or not n_b:
        return Difference(math.nan, math.nan, math.nan, n_a, n_b)
    diff = float(a.mean() - b.mean())
    if n_a < 2 or n_b < 2:
        return Difference(diff, math.nan, math.nan, n_a, n_b)
    va, vb = float(a.var(ddof=1)) / n_a, float(b.var(ddof=1)) / n_b
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(diff, diff, diff, n_a, n_b)
    df = (va + vb) ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1))  # Welch–Satterthwaite
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return Difference(diff, diff - half, diff + half, n_a, n_b)


def as_settings(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``frame`` with its setting columns as text (missing: ""), so settings group and match exactly."""
    return frame.assign(**{k: frame[k].astype("string").fillna("") for k in keys})


def parse_baseline(text: str) -> tuple[str, str]:
    """``variant=plain`` -> ("variant", "plain")."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--baseline {text!r}: give KEY=VALUE, e.g. --baseline variant=plain")
    return key.strip(), value.strip()


def baseline_differences(frame: pd.DataFrame, keys: list[str], baseline: tuple[str, str], metric: str = "target_top1"
                         ) -> dict[tuple, Difference]:
    """For each setting (the values of ``keys``), its difference to the reference setting: the one with
    the same values on every other key and ``baseline``'s value on its key (so at each depth,
    searched is compared with plain at that depth). Only completed jobs count."""
    key, value = baseline
    if key not in keys:
        raise ConfigError(f"--baseline {key}={value}: {key} is not a swept setting here (swept: {', '.join(keys) or 'none'})")
    frame = as_settings(frame, keys)
    done = frame[frame["status"] == "completed"]
    groups = {k if isinstance(k, tuple) else (k,): g[metric] for k, g in done.groupby(keys, sort=False, dropna=False)}
    index = keys.index(key)
    out = {}
    for setting in {k if isinstance(k, tuple) else (k,) for k, _ in frame.groupby(keys, sort=False, dropna=False)}:
        reference = setting[:index] + (value,) + setting[index + 1:]
        if setting != reference and reference in groups:
            out[setting] = welch(groups.get(setting, []), groups[reference])
    return out
