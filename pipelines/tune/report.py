"""What ``pipelines.tune`` writes about a study: ``study.md`` (the best trial, parameter importances,
every trial) and ``history.png`` (the optimization history), plus each trial's ``trial.json``
refreshed from the storage (a trial whose worker died says FAIL there, not RUNNING)."""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

from repopt.io import write_json, write_text
from repopt.plots import pyplot, save_png

from .config import TARGET_STEP_OFFSET, TuneConfig
from .storage import storage_text
from .trial import trial_dir, trial_record

log = logging.getLogger("pipelines.tune")
HISTORY_PNG = "history.png"


def sync_trial_files(study, study_dir: Path) -> None:
    for trial in study.get_trials(deepcopy=False):
        folder = trial_dir(study_dir, trial.number)
        if folder.is_dir():
            write_json(folder / "trial.json", trial_record(trial, study_dir))


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def importances(study, cfg: TuneConfig) -> tuple[dict[str, float] | None, str]:
    """Parameter importances of the first objective, or None and why there are none."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"needs at least 2 completed trials (the study has {len(complete)})"
    target = (lambda t: t.values[0]) if len(cfg.objectives) > 1 else None
    try:
        return optuna.importance.get_param_importances(study, target=target), ""
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. every completed trial has the same value
        return None, f"not available: {exc}"


def plot_history(study, cfg: TuneConfig, path: Path) -> None:
    """Each completed trial's (first) objective, the best so far, pruned trials at their last
    reported value and failed trials as dotted lines."""
    import optuna

    State = optuna.trial.TrialState
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in trials if t.state == State.COMPLETE]
    maximize = cfg.directions[0] == "maximize"
    if complete:
        xs, ys = [t.number for t in complete], [t.values[0] for t in complete]
        ax.plot(xs, ys, "o", color="C0", label=f"completed: {cfg.objectives[0]}")
        best, running = [], None
        for y in ys:
            running = y if running is None else (max(running, y) if maximize else min(running, y))
            best.append(running)
        ax.step(xs, best, where="post", color="C3", label="best so far")
    pruned = [t for t in trials if t.state == State.PRUNED and t.intermediate_values]
    if pruned:
        ax.plot(
            [t.number for t in pruned],
            [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
            "x",
            color="0.5",
            label="pruned: last reported top-1",
        )
    failed = [t.number for t in trials if t.state == State.FAIL]
    for i, number in enumerate(failed):  # no value to draw: a dotted line marks the trial
        ax.axvline(number, color="C1", linestyle=":", linewidth=1, label="failed (no value)" if i == 0 else None)
    ax.set_xlabel("trial")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"{cfg.objectives[0]} ({'higher' if maximize else 'lower'} is better)")
    several = f" (the first of {len(cfg.objectives)} objectives)" if len(cfg.objectives) > 1 else ""
    ax.set_title(f"study {cfg.study_name}: optimization history{several}")
    if complete or pruned or failed:
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished trials yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    save_png(fig, path)


def study_markdown(study, cfg: TuneConfig, study_dir: Path, storage_url: str) -> str:
    import optuna

    State = optuna.trial.TrialState
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    states = Counter(t.state.name for t in trials)
    objectives = ", ".join(f"{o} ({d})" for o, d in zip(cfg.objectives, cfg.directions))
    lines = [
        f"# Study `{cfg.study_name}`",
        "",
        f"Storage `{storage_text(storage_url)}`; objective {objectives}; {cfg.n_trials} trials requested; "
        + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        + ".",
        f"Sampler {cfg.sampler.name} (seed {cfg.sampler.seed}), pruner {cfg.pruner.name}. Intermediate values: HS "
        f"epoch e is step e - 1, target epoch e is step {TARGET_STEP_OFFSET} + e - 1.",
        "",
    ]
    keys = list(cfg.space)
    lines += ["## Best trial" if len(cfg.objectives) == 1 else "## Best trials (Pareto front)", ""]
    complete = [t for t in trials if t.state == State.COMPLETE]
    if not complete:
        lines += ["No completed trial yet.", ""]
    else:
        best = [study.best_trial] if len(cfg.objectives) == 1 else sorted(study.best_trials, key=lambda t: t.number)
        lines += [
            "| trial | " + " | ".join(cfg.objectives) + " | " + " | ".join(keys) + " | directory |",
            "|" + "---|" * (2 + len(cfg.objectives) + len(keys)),
        ]
        for t in best:
            lines.append(
                f"| {t.number} | "
                + " | ".join(_fmt(v) for v in t.values)
                + " | "
                + " | ".join(_fmt(t.params.get(k)) for k in keys)
                + f" | `trial_{t.number}/` |"
            )
        lines.append("")
    found, why = importances(study, cfg)
    lines += ["## Parameter importances", ""]
    if found is None:
        lines += [f"Not computed: {why}.", ""]
    else:
        lines += [
            f"Of {cfg.objectives[0]}, by `optuna.importance.get_param_importances` (PED-ANOVA), over the completed trials:",
            "",
            "| parameter | importance |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.3f} |" for k, v in found.items()] + [""]
    lines += [
        "## Trials",
        "",
        f"![optimization history]({HISTORY_PNG})",
        "",
        "| trial | state | " + " | ".join(cfg.objectives) + " | last reported | " + " | ".join(keys) + " | s |",
        "|" + "---|" * (4 + len(cfg.objectives) + len(keys)),
    ]
    for t in trials:
        values = t.values if t.state == State.COMPLETE else [None] * len(cfg.objectives)  # a pruned trial's is its last report
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        retry = t.system_attrs.get("failed_trial")
        state = t.state.name + (f" (re-run of {retry})" if retry is not None else "")
        lines.append(
            f"| {t.number} | {state} | "
            + " | ".join(_fmt(v) for v in values)
            + f" | {_fmt(last)} | "
            + " | ".join(_fmt(t.params.get(k)) for k in keys)
            + f" | {_fmt(seconds)} |"
        )
    lines += ["", f"Every trial is a pipeline job in `trial_<n>/`; `python -m pipelines.compare {study_dir}` tables them.", ""]
    return "\n".join(lines)


def write_report(study, cfg: TuneConfig, study_dir: Path, storage_url: str) -> Path:
    """``trial.json`` of every trial, ``study.md`` and ``history.png`` (a failed plot is a warning)."""
    sync_trial_files(study, study_dir)
    try:
        plot_history(study, cfg, study_dir / HISTORY_PNG)
    except Exception as exc:  # the report matters more than its picture
        log.warning("history plot failed: %s", exc)
    path = study_dir / "study.md"
    write_text(path, study_markdown(study, cfg, study_dir, storage_url))
    return path
