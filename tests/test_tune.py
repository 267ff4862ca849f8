"""``pipelines.tune``: Optuna studies over pipeline jobs on the tiny synthetic settings.

A 3-trial study with a pruner that stops trials 1 and 2 in the target's first epoch; a study killed
(SIGKILL) during its second trial and run again; two workers on one SQLite study. Plus the pruning
callback's rules on a stand-in trainer, the presets, and the errors a bad space or a changed study
gives before any trial runs.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml

optuna = pytest.importorskip("optuna")

from pipelines.compare import compare  # noqa: E402
from pipelines.tune import main as tune_main  # noqa: E402
from pipelines.tune import run_study  # noqa: E402
from pipelines.tune.config import TARGET_STEP_OFFSET, ParamSpec, TuneConfig  # noqa: E402
from pipelines.tune.trial import PruningCallback, check_space  # noqa: E402
from repopt.config import to_typed  # noqa: E402
from repopt.errors import ConfigError  # noqa: E402
from tests.helpers.runs import REPO, _env, pipeline_overrides, read_json, run_hydra  # noqa: E402

CONF = REPO / "conf"


def base_overrides(target_epochs: int = 1) -> list[str]:
    """``pipeline_overrides()`` (one epoch per stage, tiny, synthetic, CPU) with the target's epochs
    and without compiling the target's optimizer step (a compile costs more than these runs)."""
    out = [o for o in pipeline_overrides() if not o.startswith("target.epochs=")]
    return out + [f"target.epochs={target_epochs}", "target.optim.compile_step=false"]


def write_preset(root: Path, name: str = "tiny", **settings) -> Path:
    """A search space in ``<root>/tune/<name>.yaml`` (passed with ``--config-dir <root> tune=<name>``)."""
    preset = {
        "study_name": name,
        "n_trials": 3,
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "space": {
            "hs.optim.lr": {"type": "float", "low": 0.05, "high": 0.5, "log": True},
            "target.use_identity_scales": {"type": "categorical", "choices": [True, False]},
        },
        "base": base_overrides(),
        **settings,
    }
    (root / "tune").mkdir(parents=True, exist_ok=True)
    (root / "tune" / f"{name}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(preset, sort_keys=False))
    return root


def states(db: Path) -> dict[int, str]:
    """Trial number -> state, read from the study's SQLite file without Optuna."""
    with sqlite3.connect(db, timeout=30) as con:
        return dict(con.execute("SELECT number, state FROM trials ORDER BY number").fetchall())


def load_study(study_dir: Path, name: str = "tiny"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'study.db'}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ a study with pruning


def test_study_prunes_writes_report_and_compare_lists_pruned(in_tmp):
    conf = write_preset(
        in_tmp / "conf",
        base=base_overrides(target_epochs=2),
        pruner={"name": "threshold", "lower": 101.0, "n_warmup_steps": 1, "n_startup_trials": 1},
    )
    study_dir = in_tmp / "study"
    run_hydra(tune_main, ["--config-dir", str(conf), "tune=tiny", f"study_dir={study_dir}"])

    # no tiny run reaches 101 % top-1: the first trial runs to the end (startup), the next two are pruned at their
    # first step past the warm-up, the target's first epoch (of two): mid-stage, by request_stop
    study = load_study(study_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "PRUNED"]
    assert states(study_dir / "study.db") == {0: "COMPLETE", 1: "PRUNED", 2: "PRUNED"}
    assert study.best_trial.number == 0 and study.best_value == read_json(study_dir / "trial_0/metrics.json")["top1"]
    assert set(study.trials[0].intermediate_values) == {0, TARGET_STEP_OFFSET, TARGET_STEP_OFFSET + 1}
    for n in (1, 2):
        trial = study.trials[n]
        assert set(trial.intermediate_values) == {0, TARGET_STEP_OFFSET}  # HS epoch 1, target epoch 1: then pruned
        job = study_dir / f"trial_{n}"
        joined = read_json(job / "metrics.json")
        assert (
            joined["status"] == "pruned"
            and joined["failed_stage"] == "target"
            and "pruned after target epoch 1" in joined["error"]
        )
        assert joined["hs"]["status"] == "completed" and joined["target"]["status"] == "pruned"
        # the stopped stage is recorded as pruned, and its metrics, history and last.pt agree on where it stopped
        stage = read_json(job / "target/metrics.json")
        assert (
            stage["status"] == "pruned"
            and stage["epochs"] == 1
            and stage["top1"] == trial.intermediate_values[TARGET_STEP_OFFSET]
        )
        assert len((job / "target/history.csv").read_text().splitlines()) == 2
        run = torch.load(job / "target/last.pt", weights_only=True, map_location="cpu")["run"]
        assert run["epoch"] == 1 and run["global_step"] == stage["steps"]
        assert read_json(job / "trial.json")["state"] == "PRUNED"
        overrides = yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        assert overrides[: len(base_overrides(2))] == base_overrides(2)
        assert f"hs.optim.lr={trial.params['hs.optim.lr']!r}" in overrides
    assert read_json(study_dir / "trial_0/metrics.json")["status"] == "completed"

    report = (study_dir / "study.md").read_text()
    assert "## Best trial" in report and "| 0 | COMPLETE |" in report and "| 2 | PRUNED |" in report
    assert "needs at least 2 completed trials (the study has 1)" in report  # importances: handled, not a crash
    assert (study_dir / "history.png").stat().st_size > 1000
    assert sorted(p.name for p in in_tmp.iterdir()) == ["conf", "study"]  # nothing written beside the study

    compare([study_dir], plots=False)
    frame = pd.read_csv(study_dir / "comparison.csv")
    assert list(frame["trial"]) == [0, 1, 2] and list(frame["state"]) == ["COMPLETE", "PRUNED", "PRUNED"]
    assert list(frame["status"]) == ["completed", "pruned", "pruned"]
    assert sorted(frame["hs.optim.lr"]) == sorted(t.params["hs.optim.lr"] for t in study.trials)
    table = (study_dir / "comparison.md").read_text()
    assert "| 1 | PRUNED |" in table and "| pruned |" in table


# ------------------------------------------------------------------ killed and continued


def _tune_command(conf: Path, study_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipelines.tune",
        "--config-dir",
        str(conf),
        "tune=tiny",
        f"study_dir={study_dir}",
        "heartbeat_interval=1",
        "poll_seconds=0.5",
        *extra,
    ]


def test_killed_study_continues_without_rerunning_completed_trials(tmp_path):
    conf = write_preset(tmp_path / "conf")
    study_dir = tmp_path / "study"
    command = _tune_command(conf, study_dir, "n_trials=2", "grace_period=2")
    with open(tmp_path / "first.log", "w") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=_env(1), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:  # kill it once trial 0 is COMPLETE in the database and trial 1 runs
                if (
                    (study_dir / "trial_1").is_dir()
                    and (study_dir / "study.db").is_file()
                    and states(study_dir / "study.db").get(0) == "COMPLETE"
                ):
                    break
                assert proc.poll() is None, (tmp_path / "first.log").read_text()
                time.sleep(0.1)
            else:
                pytest.fail("trial 0 did not complete in time:\n" + (tmp_path / "first.log").read_text())
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -9
    assert states(study_dir / "study.db") == {0: "COMPLETE", 1: "RUNNING"}
    done = study_dir / "trial_0" / "metrics.json"
    before = (sha256(done), done.stat().st_mtime_ns, sha256(study_dir / "trial_0/target/last.pt"))

    again = subprocess.run(command, cwd=tmp_path, env=_env(1), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    study = load_study(study_dir)
    assert {t.number: t.state.name for t in study.trials} == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE"}
    rerun = study.trials[2]  # the killed trial, failed by its missing heartbeat and run again under a new number
    assert rerun.system_attrs["failed_trial"] == 1 and rerun.params == study.trials[1].params
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 2
    assert (sha256(done), done.stat().st_mtime_ns, sha256(study_dir / "trial_0/target/last.pt")) == before
    assert "trial 0:" not in again.stderr + again.stdout  # the completed trial was not started again
    assert read_json(study_dir / "trial_1/trial.json")["state"] == "FAIL"
    assert read_json(study_dir / "trial_2/trial.json")["retry_of"] == 1
    assert "re-run of 1" in (study_dir / "study.md").read_text()


# ------------------------------------------------------------------ two workers, one study


def test_two_workers_share_one_sqlite_study(tmp_path):
    conf = write_preset(tmp_path / "conf")
    study_dir = tmp_path / "study"
    command = _tune_command(conf, study_dir, "n_trials=4", "grace_period=60")
    logs = [tmp_path / f"worker{i}.log" for i in (0, 1)]
    handles = [open(log, "w") for log in logs]
    try:
        procs = [subprocess.Popen(command, cwd=tmp_path, env=_env(1), stdout=h, stderr=subprocess.STDOUT) for h in handles]
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for h in handles:
            h.close()
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    assert states(study_dir / "study.db") == {n: "COMPLETE" for n in range(4)}
    assert sorted(p.name for p in study_dir.glob("trial_*")) == [f"trial_{n}" for n in range(4)]
    ran = [set(map(int, re.findall(r"- trial (\d+): top1", log.read_text()))) for log in logs]
    assert ran[0].isdisjoint(ran[1]) and ran[0] | ran[1] == {0, 1, 2, 3}, ran  # each trial ran once, in one worker
    study = load_study(study_dir)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4  # the workers did not draw alike
    for n in range(4):
        job = study_dir / f"trial_{n}"
        assert read_json(job / "metrics.json")["status"] == "completed"
        assert len((job / "hs/history.csv").read_text().splitlines()) == 2  # one epoch, written once
        assert read_json(job / "trial.json")["state"] == "COMPLETE"


# ------------------------------------------------------------------ the pruning rules, on a stand-in trainer


class _Trial:
    def __init__(self, prune_at: set[int]):
        self.number, self.prune_at, self.reported, self.asked = 0, prune_at, [], []

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        self.asked.append(self.reported[-1][0])
        return self.reported[-1][0] in self.prune_at


def _trainer(stage: str, epochs: int, done: int):
    stopped = []
    trainer = SimpleNamespace(
        metrics_extra={"stage": stage},
        cfg=SimpleNamespace(epochs=epochs),
        state=SimpleNamespace(epoch=done),
        request_stop=lambda: stopped.append(True),
    )
    return trainer, stopped


def test_pruning_callback_steps_and_where_it_stops():
    # by default HS epochs are reported but the pruner is not asked: nothing stops, whatever it would say
    trial = _Trial({0, 1})
    cb = PruningCallback(trial)
    trainer, stopped = _trainer("hypersearch", 2, 1)
    cb.on_epoch_end(trainer, {"epoch": 1, "test_top1": 12.5})
    trainer.state.epoch = 2
    cb.on_epoch_end(trainer, {"epoch": 2, "test_top1": 13.5})
    assert trial.reported == [(0, 12.5), (1, 13.5)] and trial.asked == [] and stopped == [] and cb.pruned is None
    cb.after_stage("hs", None)

    # during_search: HS epoch 1 of 3: prune -> the trainer is asked to stop at once
    trial = _Trial({0})
    cb = PruningCallback(trial, during_search=True)
    trainer, stopped = _trainer("hypersearch", 3, 1)
    cb.on_epoch_end(trainer, {"epoch": 1, "test_top1": 12.5})
    assert trial.reported == [(0, 12.5)] and stopped == [True] and cb.pruned.stage == "hs"
    with pytest.raises(optuna.TrialPruned):
        cb.after_stage("hs", None)

    # the last HS epoch: nothing left to stop; the job ends before stage two
    trial = _Trial({1})
    cb = PruningCallback(trial, during_search=True)
    trainer, stopped = _trainer("hypersearch", 2, 2)
    cb.on_epoch_end(trainer, {"epoch": 2, "test_top1": 20.0})
    assert stopped == [] and cb.pruned.step == 1
    with pytest.raises(optuna.TrialPruned, match="after hs epoch 2"):
        cb.after_stage("hs", None)

    # target epochs are steps TARGET_STEP_OFFSET + e - 1; a target that ran all its epochs is not pruned
    trial = _Trial({TARGET_STEP_OFFSET + 1})
    cb = PruningCallback(trial)
    trainer, stopped = _trainer("target_train", 2, 1)
    cb.on_epoch_end(trainer, {"epoch": 1, "test_top1": 30.0})
    trainer.state.epoch = 2
    cb.on_epoch_end(trainer, {"epoch": 2, "test_top1": 31.0})
    assert trial.reported == [(TARGET_STEP_OFFSET, 30.0), (TARGET_STEP_OFFSET + 1, 31.0)]
    assert trial.asked == [TARGET_STEP_OFFSET] and stopped == [] and cb.pruned is None
    cb.after_stage("target", None)  # no prune: nothing raised


# ------------------------------------------------------------------ presets and errors before any trial


def _tune_config(overrides: list[str]) -> TuneConfig:
    from hydra import compose, initialize_config_module

    with initialize_config_module("repopt.conf", version_base="1.3"):
        return to_typed(compose("tune", overrides=overrides), TuneConfig)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "tune").glob("*.yaml")))
def test_presets_compose_with_every_end_of_their_space(preset):
    cfg = _tune_config([f"tune={preset}"])
    assert cfg.space and cfg.study_dir == f"outputs/tune/{cfg.study_name}"
    check_space(cfg)  # the base plus each end of every dimension is a valid pipeline config
    assert cfg.pruner.during_search is False  # no preset prunes on stage one's own top-1


def _empty_study(tmp_path, key: str, high: float) -> TuneConfig:
    """Study "s" in tmp_path/s with no trials, searching ``key`` over [0.1, high]."""
    return to_typed(
        TuneConfig(
            study_name="s",
            study_dir=str(tmp_path / "s"),
            n_trials=0,
            base=base_overrides(),
            space={key: ParamSpec("float", 0.1, high)},
        ),
        TuneConfig,
    )


def test_bad_space_and_changed_study_are_errors_before_any_trial(tmp_path):
    cfg = _empty_study(tmp_path, "hs.optim.lrr", 0.2)
    with pytest.raises(ConfigError, match="lrr"):
        run_study(cfg)
    assert not (tmp_path / "s" / "study.db").exists()

    good = _empty_study(tmp_path, "hs.optim.lr", 0.2)
    run_study(good)  # creates the study (no trials) and its report
    assert "0 trials requested" in (tmp_path / "s" / "study.md").read_text()
    changed = _empty_study(tmp_path, "hs.optim.lr", 0.3)
    with pytest.raises(ConfigError, match="created with another space"):
        run_study(changed)
    with pytest.raises(ConfigError, match="either searched or fixed"):
        to_typed(TuneConfig(base=["hs.epochs=2"], space={"hs.epochs": ParamSpec("int", 1, 3)}), TuneConfig)
    with pytest.raises(ConfigError, match="single-objective"):
        to_typed(
            TuneConfig(
                objectives=["top1", "images_per_sec"],
                directions=["maximize", "maximize"],
                space={"hs.epochs": ParamSpec("int", 1, 3)},
            ),
            TuneConfig,
        )
