"""Typed configuration of ``python -m pipelines.tune`` (``conf/tune.yaml``; search spaces in ``conf/tune/``).

A study is a search space (``space``: pipeline config paths, each with its distribution), the
pipeline overrides every trial starts from (``base``), what it optimizes (``objectives`` and
``directions``), where it lives (``study_dir``, ``storage``) and how it samples and prunes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, Optional

from repopt.config import Checked, register_schema, require
from repopt.errors import ConfigError

# Intermediate values reported to the pruner: stage one's epoch e (1-based) is step e - 1, stage
# two's epoch e is step TARGET_STEP_OFFSET + e - 1, so a pruner compares HS with HS and target
# with target, whatever HS epochs each trial ran.
TARGET_STEP_OFFSET = 10_000

# What a trial can return (read from the job's metrics.json, a JobMetrics).
OBJECTIVES = {
    "top1": "the target's test top-1 (%), the job's top1",
    "top5": "the target's test top-5 (%)",
    "hs_top1": "stage one's test top-1 (%)",
    "images_per_sec": "the target's training throughput (images/s)",
    "wall_seconds": "the job's wall time (s)",
}
DIRECTIONS = ("maximize", "minimize")
PARAM_TYPES = ("float", "int", "categorical")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "threshold", "none")
_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def override_key(text: str) -> str:
    """The config path an override sets: ``hs.optim.lr=0.1`` -> ``hs.optim.lr``."""
    return text.partition("=")[0].strip().lstrip("+~")


def space_override(key: str, fields: str) -> str:
    """The command-line override that sets ``fields`` (``low/high``) of the space's ``key``.

    A space key is a pipeline config path with dots (``hs.optim.lr``), and Hydra's override grammar
    has no quoting for a dotted key: ``space.hs.optim.lr.high=0.2`` reads as nested keys, which the
    space does not have. A dict value works, and is merged into the entry (its other fields stay):
    ``'space={hs.optim.lr: {high: 0.2}}'`` (quoted for the shell)."""
    return "'space={" + key + ": {" + ", ".join(f"{name}: ..." for name in fields.split("/")) + "}}'"


def space_require(prefix: str):
    """``require`` for a field of the space entry ``prefix`` (``space.<key>.``): its error suggests
    the override that works (``space_override``); any other prefix keeps the usual message."""
    if not (prefix.startswith("space.") and prefix.endswith(".")):
        return require
    key = prefix[len("space.") : -1]

    def require_in_space(ok: bool, name: str, value: Any, rule: str) -> None:
        if not ok:
            field_name = name[len(prefix) :]
            raise ConfigError(
                f"{name}={value!r}: must be {rule}; set it on the command line with "
                f"{space_override(key, field_name)} or in the search space's file (conf/tune/)"
            )

    return require_in_space


@dataclass
class ParamSpec(Checked):
    """One dimension of the space: ``float`` / ``int`` in [low, high] (``log``: sampled on a log
    scale; ``step``: a grid) or ``categorical`` over ``choices``."""

    type: str = "float"  # float | int | categorical
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[list[Any]] = None

    def check(self, prefix: str = "") -> None:
        require = space_require(prefix)
        require(self.type in PARAM_TYPES, prefix + "type", self.type, "one of " + ", ".join(PARAM_TYPES))
        if self.type == "categorical":
            require(bool(self.choices), prefix + "choices", self.choices, "a non-empty list")
            require(
                self.low is None and self.high is None,
                prefix + "low/high",
                (self.low, self.high),
                "unset for a categorical parameter",
            )
            return
        require(self.choices is None, prefix + "choices", self.choices, f"unset for a {self.type} parameter")
        require(self.low is not None and self.high is not None, prefix + "low/high", (self.low, self.high), "both set")
        require(self.low <= self.high, prefix + "high", self.high, f">= low ({self.low})")
        require(not self.log or self.low > 0, prefix + "low", self.low, "> 0 with log: true")
        require(not (self.log and self.step is not None), prefix + "step", self.step, "unset with log: true")
        require(self.step is None or self.step > 0, prefix + "step", self.step, "> 0 or null")
        if self.type == "int":
            for key in ("low", "high", "step"):
                value = getattr(self, key)
                require(value is None or float(value).is_integer(), prefix + key, value, "an integer for an int parameter")

    def extremes(self) -> tuple[Any, Any]:
        """Two values of the space (its ends, or its first and last choice), to check it composes."""
        if self.type == "categorical":
            return self.choices[0], self.choices[-1]
        cast = int if self.type == "int" else float
        return cast(self.low), cast(self.high)


@dataclass
class SamplerConfig(Checked):
    name: str = "tpe"  # tpe | random
    seed: Optional[int] = 0  # trial n samples with seed (seed, n): reproducible, and workers never draw alike; null: random
    n_startup_trials: int = 10  # tpe: random trials before TPE starts modelling

    def check(self, prefix: str = "") -> None:
        require(self.name in SAMPLERS, prefix + "name", self.name, "one of " + ", ".join(SAMPLERS))
        require(self.n_startup_trials >= 0, prefix + "n_startup_trials", self.n_startup_trials, ">= 0")


@dataclass
class PrunerConfig(Checked):
    """How trials are stopped early from their per-epoch test top-1 (steps: see TARGET_STEP_OFFSET)."""

    name: str = "median"  # median | hyperband | threshold | none
    # Stage one's epochs are reported (they show in study.md) but the pruner is asked only from the
    # target's first epoch on: stage one's own top-1 does not predict the target's (the paper's
    # finding, and docs/results/ablation_cifar10.md: searched scales level with their init while HS
    # top-1 keeps rising), so pruning on it would stop trials by a number that does not rank them.
    # true: ask after every HS epoch too (a study that optimizes hs_top1, or a known-bad recipe).
    during_search: bool = False
    n_startup_trials: int = 5  # no trial is pruned before this many trials have completed (any pruner)
    n_warmup_steps: int = 0  # median, threshold: no pruning before this step
    interval_steps: int = 1  # median, threshold
    lower: Optional[float] = None  # threshold: prune below (top-1 %)
    upper: Optional[float] = None  # threshold: prune above
    min_resource: int = 1  # hyperband (resource = step)
    max_resource: Optional[int] = None  # hyperband; null: "auto" (the steps of the first completed trial)
    reduction_factor: int = 3  # hyperband

    def check(self, prefix: str = "") -> None:
        require(self.name in PRUNERS, prefix + "name", self.name, "one of " + ", ".join(PRUNERS))
        for key in ("n_startup_trials", "n_warmup_steps"):
            require(getattr(self, key) >= 0, prefix + key, getattr(self, key), ">= 0")
        for key in ("interval_steps", "min_resource"):
            require(getattr(self, key) >= 1, prefix + key, getattr(self, key), ">= 1")
        require(self.reduction_factor >= 2, prefix + "reduction_factor", self.reduction_factor, ">= 2")
        require(
            self.name != "threshold" or self.lower is not None or self.upper is not None,
            prefix + "lower",
            self.lower,
            "set (or upper) for pruner.name=threshold",
        )


@dataclass
class TuneConfig(Checked):
    study_name: str = "study"  # the study in its storage (and its folder name)
    study_dir: Optional[str] = None  # trial_<n>/ job dirs, study.db, study.md; null: outputs/tune/<study_name>
    n_trials: int = 20  # the study's total (COMPLETE, PRUNED, FAIL, RUNNING): running the command again continues it
    objectives: list[str] = field(default_factory=lambda: ["top1"])  # see OBJECTIVES; two or more: multi-objective
    directions: list[str] = field(default_factory=lambda: ["maximize"])  # one per objective
    storage: Optional[str] = None  # an SQLAlchemy URL (postgresql://..., mysql://...); null: sqlite <study_dir>/study.db
    heartbeat_interval: int = 60  # s between a running trial's heartbeats
    grace_period: Optional[int] = None  # s without a heartbeat before a running trial is failed and retried; null: 2 x interval
    max_retry: Optional[int] = 3  # re-runs of a trial whose worker died; null: unlimited
    db_timeout: float = 60.0  # SQLite: seconds to wait for a lock held by another worker
    poll_seconds: float = 5.0  # a worker with nothing to claim checks running trials this often
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    space: dict[str, ParamSpec] = field(default_factory=dict)  # pipeline config path -> distribution
    base: list[str] = field(default_factory=list)  # pipeline overrides every trial starts from

    def check(self, prefix: str = "") -> None:
        require(
            bool(_STUDY_NAME.fullmatch(self.study_name)),
            "study_name",
            self.study_name,
            "letters, digits, '_', '.', '-' (it names a directory)",
        )
        require(self.n_trials >= 0, "n_trials", self.n_trials, ">= 0")
        require(bool(self.objectives), "objectives", self.objectives, "at least one of " + ", ".join(OBJECTIVES))
        for name in self.objectives:
            require(name in OBJECTIVES, "objectives", name, "one of " + ", ".join(OBJECTIVES))
        require(
            len(self.directions) == len(self.objectives),
            "directions",
            self.directions,
            f"one per objective ({len(self.objectives)})",
        )
        for direction in self.directions:
            require(direction in DIRECTIONS, "directions", direction, "maximize or minimize")
        if len(self.objectives) > 1 and self.pruner.name != "none":
            raise ConfigError(
                f"objectives={self.objectives}: Optuna prunes single-objective studies only; "
                f"set pruner.name=none or one objective"
            )
        require(self.heartbeat_interval >= 1, "heartbeat_interval", self.heartbeat_interval, ">= 1")
        require(self.grace_period is None or self.grace_period >= 1, "grace_period", self.grace_period, ">= 1 or null")
        require(self.max_retry is None or self.max_retry >= 0, "max_retry", self.max_retry, ">= 0 or null")
        require(self.db_timeout > 0, "db_timeout", self.db_timeout, "> 0")
        require(self.poll_seconds > 0, "poll_seconds", self.poll_seconds, "> 0")
        if not self.space:
            presets = sorted(
                p.name.removesuffix(".yaml") for p in (files("repopt.conf") / "tune").iterdir() if p.name.endswith(".yaml")
            )
            raise ConfigError(
                f"no search space: choose a study with tune=<name> ({', '.join(presets)}), "
                f"e.g. python -m pipelines.tune tune=quickstart"
            )
        base_keys = {override_key(o) for o in self.base}
        for key in self.space:
            if key in base_keys:
                raise ConfigError(f"space.{key} is also set in base ({key}=...); a key is either searched or fixed")
        super().check(prefix)
        for key, spec in self.space.items():
            spec.check(f"space.{key}.")


register_schema("tune_schema", TuneConfig)
