"""Experiment tracking (``logger=none|tensorboard|mlflow``, repopt/tracking.py): what lands in
TensorBoard's event files and in an MLflow store is read back with the libraries' own readers and
checked against the run directory's history.csv and metrics.json."""

from __future__ import annotations

import csv
import dataclasses
import shutil
import sys

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

from hypersearch.app import main as hs_main
from hypersearch.config import HSConfig
from hypersearch.export import abs_scales_by_stage
from pipelines.compare import main as compare_main
from pipelines.config import PipelineConfig
from pipelines.search_and_train import main as pipeline_main
from repopt import tracking
from repopt.config import LOGGERS, LoggerConfig, to_typed
from repopt.engine.callbacks import Callback, active
from repopt.errors import ConfigError
from repopt.family import get_spec
from repopt.io import sha256_file
from target_train.app import main as target_main
from target_train.config import TargetConfig
from tests.helpers.runs import REPO, TINY, pipeline_overrides, read_json, run_hydra

CONF_DIR = REPO / "conf"


def _history(path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def _assert_one_point_per_epoch(events, history: list[dict]) -> None:
    for key in ("test_top1", "test_top5", "test_loss", "train_loss", "train_top1", "lr"):
        points = events.Scalars(key)
        assert [p.step for p in points] == [int(r["epoch"]) for r in history], key
        # history.csv keeps 6 significant digits; the event file has the float32 of the exact value
        assert [p.value for p in points] == pytest.approx([r[key] for r in history], rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_hs_run_has_history_scalars_and_scale_histograms(in_tmp):
    run_dir = in_tmp / "run"
    run_hydra(hs_main, TINY + ["logger=tensorboard", f"hydra.run.dir={run_dir}"])
    history = _history(run_dir / "history.csv")
    assert len(history) == 2
    events = _events(run_dir / "tb")
    _assert_one_point_per_epoch(events, history)
    # tiny VGG: stage0..stage4; one histogram of |s| per stage and epoch, and its mean as a scalar
    final = abs_scales_by_stage(load_file(run_dir / "scales.safetensors"))
    assert sorted(final) == [f"stage{i}" for i in range(5)]
    assert set(events.Tags()["histograms"]) == {f"scales/{stage}" for stage in final}
    for stage, values in final.items():
        histograms = events.Histograms(f"scales/{stage}")
        assert [h.step for h in histograms] == [1, 2]
        assert histograms[-1].histogram_value.num == values.numel()
        assert histograms[-1].histogram_value.min == pytest.approx(float(values.min()), rel=1e-6)
        means = events.Scalars(f"scales_abs_mean/{stage}")
        assert [m.step for m in means] == [1, 2]
        assert means[-1].value == pytest.approx(float(values.mean()), rel=1e-6)  # the exported scales are epoch 2's
    assert not (in_tmp / "outputs").exists()


def test_tensorboard_pipeline_stages_inherit_the_logger(in_tmp):
    job = in_tmp / "job"
    run_hydra(
        pipeline_main,
        pipeline_overrides()
        + ["logger=tensorboard", "hs.epochs=2", "target.epochs=2", "target.optim.compile_step=false", f"hydra.run.dir={job}"],
    )
    for stage in ("hs", "target"):
        _assert_one_point_per_epoch(_events(job / stage / "tb"), _history(job / stage / "history.csv"))
    assert not _events(job / "target" / "tb").Tags()["histograms"]  # scales are stage one's
    assert not (job / "tb").exists()  # the job itself has nothing to plot


@pytest.mark.parametrize("root,schema", [("hypersearch", HSConfig), ("target_train", TargetConfig)])
def test_stage_apps_select_the_logger(root, schema):
    with initialize_config_module("repopt.conf", version_base="1.3"):
        cfg = to_typed(compose(root, ["logger=mlflow", "logger.experiment=e"]), schema)
        assert to_typed(compose(root), schema).logger == LoggerConfig()  # none by default
    assert (cfg.logger.name, cfg.logger.experiment, cfg.logger.tracking_uri) == ("mlflow", "e", None)


def test_pipeline_stages_follow_every_logger_key():
    """``hs.logger`` and ``target.logger`` interpolate each key of the job's ``logger``."""
    values = {
        "name": "mlflow",
        "tracking_uri": "sqlite:///x.db",
        "experiment": "e",
        "artifact_location": "/a",
        "artifacts": False,
        "scales": False,
    }
    assert set(values) == {f.name for f in dataclasses.fields(LoggerConfig)}
    with initialize_config_module("repopt.conf", version_base="1.3"):
        cfg = to_typed(compose("search_and_train", [f"logger.{k}={v}" for k, v in values.items()]), PipelineConfig)
    assert cfg.logger == cfg.hs.logger == cfg.target.logger == LoggerConfig(**values)
    raw = yaml.safe_load((CONF_DIR / "search_and_train.yaml").read_text())
    for stage in ("hs", "target"):
        assert raw[stage]["logger"] == {k: f"${{logger.{k}}}" for k in values}


def test_logger_choices_are_checked():
    with pytest.raises(ConfigError, match=r"^logger.name='wandb': must be one of none, tensorboard, mlflow"):
        to_typed({"logger": {"name": "wandb"}}, HSConfig)
    with pytest.raises(ConfigError, match=r"^hs.logger.experiment=' ': must be a non-empty name"):
        to_typed({"hs": {"logger": {"experiment": " "}}}, PipelineConfig)
    assert sorted(p.stem for p in (CONF_DIR / "logger").glob("*.yaml")) == sorted(LOGGERS)


# ---------------------------------------------------------------- MLflow


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """An MLflow SQLite store with its tables created once (MLflow's migrations take ~10 s); tests copy it."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(empty_store, tmp_path, monkeypatch):
    """A fresh store in tmp_path: its tracking URI, also set for ``mlflow.search_runs``."""
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(empty_store, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _runs(experiment: str = "repopt"):
    import mlflow

    return {row["tags.mlflow.runName"]: row for _, row in mlflow.search_runs(experiment_names=[experiment]).iterrows()}


def test_mlflow_pipeline_nests_both_stage_runs_under_the_job(in_tmp, store):
    import mlflow

    job = in_tmp / "job"
    run_hydra(
        pipeline_main,
        pipeline_overrides()
        + ["logger=mlflow", f"logger.tracking_uri={store}", "target.optim.compile_step=false", f"hydra.run.dir={job}"],
    )
    runs = _runs()
    assert set(runs) == {f"search_and_train {in_tmp.name}/job", "hypersearch", "target_train"}
    parent = runs.pop(f"search_and_train {in_tmp.name}/job")
    assert parent["status"] == "FINISHED" and not isinstance(parent.get("tags.mlflow.parentRunId"), str)
    assert parent["params.variant"] == "searched" and parent["params.hs.epochs"] == "1"
    joined = read_json(job / "metrics.json")
    assert parent["metrics.top1"] == joined["top1"] and parent["metrics.hs_top1"] == joined["hs_top1"]
    client = mlflow.MlflowClient()
    for name, folder in (("hypersearch", job / "hs"), ("target_train", job / "target")):
        run, metrics = runs[name], read_json(folder / "metrics.json")
        assert run["tags.mlflow.parentRunId"] == parent["run_id"] and run["status"] == "FINISHED"
        assert run["metrics.test_top1"] == metrics["top1"] == run["metrics.top1"]
        assert run["params.epochs"] == "1" and run["params.logger.name"] == "mlflow"
        history = client.get_metric_history(run["run_id"], "test_top1")
        assert [(m.step, m.value) for m in history] == [(1, metrics["top1"])]
        artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
        assert {"metrics.json", "history.csv"} <= artifacts
        assert read_json(folder / "mlflow_run.json")["run_id"] == run["run_id"]
    hs_run = runs["hypersearch"]
    assert "scales.safetensors" in {a.path for a in client.list_artifacts(hs_run["run_id"])}
    local = client.download_artifacts(hs_run["run_id"], "scales.safetensors", str(in_tmp))
    assert sha256_file(local) == read_json(job / "hs" / "metrics.json")["scales_sha256"]
    assert "scales_abs_mean/stage1" in {k.removeprefix("metrics.") for k in hs_run.index if k.startswith("metrics.")}
    # the sweep comparison goes to a run of its own
    assert compare_main([str(job), "--no-plots", "--mlflow", store]) == 0
    compare_run = client.get_run(read_json(job / "mlflow_compare_run.json")["run_id"])
    assert compare_run.data.tags["repopt.stage"] == "compare" and compare_run.info.status == "FINISHED"
    assert {"comparison.csv", "comparison.md"} <= {a.path for a in client.list_artifacts(compare_run.info.run_id)}
    assert compare_main([str(job), "--no-plots", "--mlflow", store]) == 0  # again: the same run, updated
    assert read_json(job / "mlflow_compare_run.json")["run_id"] == compare_run.info.run_id
    assert len(_runs()) == 4 and client.get_run(parent["run_id"]).data.tags["repopt.stage"] == "search_and_train"


class _StopAfterOneStep(Callback):
    def on_step_end(self, trainer) -> None:
        trainer.request_stop()


def test_mlflow_status_follows_the_result(in_tmp, store):
    """Interrupted -> KILLED (and resume=true continues the same run to FINISHED); diverged -> FAILED."""
    run_dir = in_tmp / "run"
    with active(_StopAfterOneStep()):
        run_hydra(hs_main, TINY + ["logger=mlflow", f"logger.tracking_uri={store}", f"hydra.run.dir={run_dir}"], expect_exit=130)
    (run,) = _runs().values()
    assert run["status"] == "KILLED" and run["tags.repopt.status"] == "interrupted"
    run_hydra(hs_main, TINY + ["logger=mlflow", f"logger.tracking_uri={store}", "resume=true", f"hydra.run.dir={run_dir}"])
    (resumed,) = _runs().values()
    assert resumed["run_id"] == run["run_id"] and resumed["status"] == "FINISHED"
    assert resumed["metrics.test_top1"] == read_json(run_dir / "metrics.json")["top1"]

    diverged = in_tmp / "diverged"
    run_hydra(
        hs_main,
        TINY
        + [
            "epochs=1",
            "optim.lr=1e30",
            "sched.warmup_epochs=0",
            "logger=mlflow",
            f"logger.tracking_uri={store}",
            f"hydra.run.dir={diverged}",
        ],
        expect_exit=1,
    )
    failed = next(r for r in _runs().values() if r["run_id"] != run["run_id"])
    assert failed["status"] == "FAILED" and "non-finite loss" in failed["tags.repopt.error"]


def test_default_tracking_uri_is_under_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = LoggerConfig(name="mlflow")
    nested = tmp_path / "outputs" / "search_and_train" / "multirun" / "d" / "t" / "0" / "hs"
    assert tracking.tracking_uri(cfg, nested) == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    assert tracking.tracking_uri(cfg, tmp_path / "elsewhere" / "run") == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    assert tracking.tracking_uri(LoggerConfig(name="mlflow", tracking_uri="http://host:5000"), nested) == "http://host:5000"


# ---------------------------------------------------------------- none, missing packages, failures, ranks


class _BlockImports:
    """A meta-path finder that records and refuses every import of ``names`` (and their submodules)."""

    def __init__(self, names):
        self.names, self.attempts = names, []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names or fullname.startswith("torch.utils.tensorboard"):
            self.attempts.append(fullname)
            raise ImportError(f"{fullname} is blocked by the test")
        return None


def test_logger_none_writes_nothing_extra_and_imports_neither_library(in_tmp, monkeypatch):
    for name in [
        m for m in sys.modules if m.split(".")[0] in ("mlflow", "tensorboard") or m.startswith("torch.utils.tensorboard")
    ]:
        monkeypatch.delitem(sys.modules, name)  # loaded by an earlier test: a new import would reach the finder
    blocker = _BlockImports(("mlflow", "tensorboard"))
    monkeypatch.setattr(sys, "meta_path", [blocker, *sys.meta_path])
    run_hydra(hs_main, TINY + ["epochs=1", f"hydra.run.dir={in_tmp / 'run'}"])
    assert blocker.attempts == []
    assert read_json(in_tmp / "run" / "metrics.json")["status"] == "completed"
    assert {p.name for p in (in_tmp / "run").iterdir()} == {
        ".hydra",
        ".lock",
        "app.log",
        "metrics.json",
        "history.csv",
        "last.pt",
        "scales.safetensors",
        "scales.csv",
        "scales.png",
    }
    assert {p.name for p in in_tmp.iterdir()} == {"run"}  # no mlflow.db, mlruns/ or outputs/ beside it


@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_a_missing_library_is_one_clear_error_before_training(in_tmp, capsys, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # what an environment without the package gives: ImportError
    run_dir = in_tmp / "run"
    run_hydra(hs_main, TINY + [f"logger={name}", f"hydra.run.dir={run_dir}"], expect_exit=1)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"logger={name} needs the {name} package" in err[0] and 'pip install -e ".[track]"' in err[0]
    assert not (run_dir / "history.csv").exists() and not (run_dir / "last.pt").exists()
    assert read_json(run_dir / "metrics.json")["status"] == "failed"


def test_a_failing_tracker_loses_no_metrics(in_tmp, monkeypatch):
    def broken(self, epoch, values, scales):
        raise OSError("disk full")

    monkeypatch.setattr(tracking.TensorBoardTracker, "_log_epoch", broken)
    run_dir = in_tmp / "run"
    run_hydra(hs_main, TINY + ["logger=tensorboard", f"hydra.run.dir={run_dir}"])
    assert read_json(run_dir / "metrics.json")["status"] == "completed"
    assert len(_history(run_dir / "history.csv")) == 2
    warnings = [line for line in (run_dir / "app.log").read_text().splitlines() if "[repopt.tracking][WARNING]" in line]
    assert len(warnings) == 1 and "disk full" in warnings[0]  # once, then tracking is off for the run


def test_only_rank_0_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    for name in ("tensorboard", "mlflow"):
        tracker = tracking.open_tracker(
            LoggerConfig(name=name, tracking_uri=f"sqlite:///{tmp_path}/x.db"), tmp_path / "run", "hs"
        )
        assert not tracker.enabled
    assert not list(tmp_path.iterdir())


def test_ghostnet_scales_group_by_block_group():
    scales = get_spec("ghostnet_tiny").init_scales()
    by_stage = abs_scales_by_stage(scales)
    groups = sorted({int(k.split(".")[1]) for k in scales})
    assert list(by_stage) == [f"stage{g}" for g in groups]
    assert sum(v.numel() for v in by_stage.values()) == sum(v.numel() for v in scales.values())
    assert all(bool((v >= 0).all()) and v.dtype == torch.float32 for v in by_stage.values())


def test_target_run_logs_deploy_file(in_tmp, store):
    import mlflow

    run_dir = in_tmp / "run"
    run_hydra(
        target_main,
        TINY + ["epochs=1", "scales=init", "logger=mlflow", f"logger.tracking_uri={store}", f"hydra.run.dir={run_dir}"],
    )
    (run,) = _runs().values()
    assert run["tags.mlflow.runName"].startswith("target_train") and run["status"] == "FINISHED"
    assert {"deploy.pt", "metrics.json", "history.csv"} <= {a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"])}
