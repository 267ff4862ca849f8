"""Command-line edges a new user meets: an output directory that cannot be created, a damaged study
database, the override that sets a search-space entry, an error shown once, final tables in the run's
log file, and the decoded-image cache kept out of the data root."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hypersearch.app import main as hs_main
from repopt.config import to_typed

from .helpers.fake_datasets import write_fake_imagefolder
from .helpers.runs import TINY, _env, run_hydra, train_tiny_target


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line]


# ------------------------------------------------------------------ 1. an output directory Hydra cannot create


def _blocked_dirs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Output directories that cannot be created, with the reason the error gives."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    cases = {
        "existing file": (a_file, "is a file, not a directory"),
        "under a file": (a_file / "run", "cannot be created (Not a directory)"),
    }
    if Path("/proc").is_dir():  # Linux: procfs refuses new entries, files as well as directories
        cases["under /proc"] = (Path("/proc") / f"repopt-test-{os.getpid()}", "cannot be created")
        cases["/proc itself"] = (Path("/proc"), "is not writable")
    return cases


@pytest.mark.parametrize("case", ["existing file", "under a file", "under /proc", "/proc itself"])
def test_an_output_dir_that_cannot_be_created_is_one_error_line(tmp_path, capsys, case):
    """Hydra creates hydra.run.dir in run_job, before the app's code; that failure used to be a double traceback."""
    cases = _blocked_dirs(tmp_path)
    if case not in cases:
        pytest.skip("no /proc here")  # not Linux
    target, reason = cases[case]
    before = _files(tmp_path)
    run_hydra(hs_main, TINY + [f"hydra.run.dir={target}"], expect_exit=1)
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert err[0].startswith(f"error: output directory {target} (hydra.run.dir) {reason}"), err
    assert err[0].endswith("choose another with hydra.run.dir=..."), err
    assert _files(tmp_path) == before and not (case == "under /proc" and target.exists()), "nothing written"


def test_tune_names_study_dir_when_it_is_the_output_dir(tmp_path, capsys):
    """The tune app's Hydra directory is ${study_dir}: the fix to suggest is study_dir=..."""
    from pipelines.tune.app import main as tune_main

    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    run_hydra(tune_main, ["tune=quickstart", f"study_dir={blocked}"], expect_exit=1)
    err = _error_lines(capsys.readouterr().err)
    assert err == [f"error: output directory {blocked} (study_dir) is a file, not a directory; choose another with study_dir=..."]


def test_the_command_line_shows_no_traceback(tmp_path):
    """The real command: one line on stderr, nothing on stdout, exit code 1."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    done = subprocess.run(
        [sys.executable, "-m", "hypersearch", *TINY, f"hydra.run.dir={blocked}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == "" and _error_lines(done.stderr) == [
        f"error: output directory {blocked} (hydra.run.dir) is a file, not a directory; choose another with hydra.run.dir=..."
    ]


# ------------------------------------------------------------------ 2. a damaged study.db


def _real_study_db(path: Path) -> None:
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    study = optuna.create_study(study_name="quickstart", storage=storage)
    for x in (0.1, 0.5, 0.9):
        study.enqueue_trial({"x": x})
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    storage.engine.dispose()  # close the file before it is cut


@pytest.mark.parametrize("damage", ["truncated", "not a database"])
def test_a_damaged_study_db_is_one_line_naming_the_file(tmp_path, capsys, damage):
    pytest.importorskip("optuna")
    from pipelines.tune.app import main as tune_main

    study_dir = tmp_path / "study"
    study_dir.mkdir()
    db = study_dir / "study.db"
    if damage == "truncated":
        _real_study_db(db)
        data = db.read_bytes()
        db.write_bytes(data[: len(data) // 2])
    else:
        db.write_bytes(os.urandom(4096))
    before = db.read_bytes()
    capsys.readouterr()  # Optuna's own lines while the database was built
    run_hydra(tune_main, ["tune=quickstart", f"study_dir={study_dir}"], expect_exit=1)
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: cannot read the study in {db} ("), err
    assert "restore it from a backup" in err[0] and "move it away" in err[0], err
    assert db.read_bytes() == before, "the damaged file is left as it was"


# ------------------------------------------------------------------ 3. the override that sets a space entry


def _compose_tune(overrides: list[str]):
    from hydra import compose, initialize_config_module

    from pipelines.tune.config import TuneConfig

    with initialize_config_module("repopt.conf", version_base="1.3"):
        return to_typed(compose(config_name="tune", overrides=overrides), TuneConfig)


def test_a_bad_space_entry_suggests_an_override_that_works(tmp_path, capsys):
    """space.hs.optim.lr.high=... cannot work (the key has dots); the message suggests the dict form."""
    from pipelines.tune.app import main as tune_main

    run_hydra(tune_main, ["tune=quickstart", f"study_dir={tmp_path / 's'}", "space={hs.optim.lr: {low: 0.6}}"], expect_exit=1)
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    suggested = re.search(r"set it on the command line with '(space=\{.*\})'", err[0])
    assert suggested and suggested.group(1) == "space={hs.optim.lr: {high: ...}}", err[0]
    fixed = _compose_tune(["tune=quickstart", "space={hs.optim.lr: {low: 0.6}}", suggested.group(1).replace("...", "0.7")])
    lr = fixed.space["hs.optim.lr"]
    assert (lr.low, lr.high, lr.log) == (0.6, 0.7, True)  # merged: the entry's other fields stay
    added = _compose_tune(["tune=quickstart", "++space={hs.optim.momentum: {type: float, low: 0.8, high: 0.95}}"])
    assert added.space["hs.optim.momentum"].high == 0.95 and "hs.optim.lr" in added.space  # README's second form


# ------------------------------------------------------------------ 4. an error appears once on the terminal


def test_an_error_is_shown_once_and_kept_in_the_log_file(tmp_path):
    """Hydra's console handler printed the logged error and the app printed it again on stderr."""
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "hypersearch", *TINY, "optim.lr=-1", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    message = "optim.lr=-1.0: must be > 0"
    assert done.returncode == 1, done.stderr
    assert (done.stdout + done.stderr).count(message) == 1, done.stdout + done.stderr
    assert _error_lines(done.stderr)[-1].startswith(f"error: {message}")
    assert (run_dir / "app.log").read_text().count(message) == 1


# ------------------------------------------------------------------ 5. final tables go to the run's log file


def test_the_prune_summary_is_in_its_log_file(tmp_path, capsys):
    pytest.importorskip("torch_pruning")
    pytest.importorskip("onnxruntime")
    from target_train.prune import main as prune_main

    run_dir = train_tiny_target(tmp_path, "target", ["scales=init", "deploy=false"])
    run_hydra(prune_main, [f"run={run_dir}", "epochs=0", "latency_runs=2", "latency_warmup=0", "threads=1", "progress=off"])
    log_text = (run_dir / "prune_logs" / "prune.log").read_text()
    assert "top-1 before" in log_text and "MACs ratio" in log_text


# ------------------------------------------------------------------ 6. the decoded-image cache


def test_the_image_cache_is_not_written_into_the_data_root(tmp_path, monkeypatch):
    import torch

    from repopt.config import DataConfig
    from repopt.data import build_data

    root = tmp_path / "folder"
    write_fake_imagefolder(root, ["a", "b"], n_per_class=4, size=8)
    before = _files(root)
    monkeypatch.delenv("REPOPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = DataConfig(
        name="imagefolder", root=str(root), image_size=8, batch_size=4, eval_batch_size=4, download=False, num_workers=0
    )
    build_data(cfg, torch.device("cpu"))
    assert _files(root) == before, "nothing written into the data root"
    assert len(list((tmp_path / "xdg" / "repopt" / "decoded").glob("*.pt"))) == 2  # train and val


def test_repopt_cache_dir_moves_the_default(tmp_path, monkeypatch):
    from repopt.config import DataConfig
    from repopt.data.cache import cache_dirs

    monkeypatch.setenv("REPOPT_CACHE_DIR", str(tmp_path / "scratch"))
    assert cache_dirs(DataConfig()) == [tmp_path / "scratch"]
    assert cache_dirs(DataConfig(cache_dir=str(tmp_path / "mine"))) == [tmp_path / "mine", tmp_path / "scratch"]


# ------------------------------------------------------------------ 7. data= for both pipeline stages


def _compose_pipeline(overrides: list[str]):
    from hydra import compose, initialize_config_module

    from pipelines.config import PipelineConfig

    with initialize_config_module("repopt.conf", version_base="1.3"):
        return to_typed(compose(config_name="search_and_train", overrides=overrides), PipelineConfig)


@pytest.mark.parametrize(
    "overrides, hs, target",
    [
        ([], "cifar100", "cifar100"),
        (["data=cifar10"], "cifar10", "cifar10"),
        (["data@target.data=synthetic"], "cifar100", "synthetic"),
        (["data=cifar10", "data@hs.data=synthetic"], "synthetic", "cifar10"),
    ],
)
def test_data_chooses_both_stages_and_a_stage_keeps_its_own(overrides, hs, target):
    cfg = _compose_pipeline(overrides)
    assert (cfg.hs.data.name, cfg.target.data.name, cfg.data) == (hs, target, None)


def test_a_root_data_setting_is_refused_with_the_stage_keys():
    from repopt.errors import ConfigError

    with pytest.raises(ConfigError, match=r"hs\.data\.\*=\.\.\. and target\.data\.\*=\.\.\."):
        _compose_pipeline(["data=cifar10", "+data.batch_size=64"])
