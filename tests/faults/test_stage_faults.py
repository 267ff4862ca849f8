"""Faults around a single stage's run directory: what a resume may change, what counts as divergence,
a full disk, a damaged or replaced scales file, a crash between best.pt and last.pt, and the
temporary files a killed write leaves.

What it proves, one test (or group) each:

* a resume that would train on other data (size, root, last-batch rule, crop, test subset) or with
  another forward (``fused_forward``) is refused with exit 1 and one ``error:`` line naming the key as
  ``key: old -> new``, and not a byte of the run changes; keys that change no number are accepted;
* a finite loss with a non-finite weight or BN statistic is divergence: status ``diverged`` with the
  step, the tensor named, and no checkpoint written that the project's own loader would refuse, so
  ``resume=true`` is never told the file is damaged;
* a real full disk (a small tmpfs filled after epoch 1) ends the run with one ``error:`` line naming
  the file, the epoch-1 ``last.pt`` intact and no temporary file left; freed, ``resume=true`` finishes
  with the scales of a run that never hit the full disk, bit for bit. An injected ENOSPC on the scales
  export leaves the run ``failed``, never ``completed``;
* stage two refuses a stage-one scales file that differs from the one its run recorded (one flipped
  bit), by directory and by file, and resumes only with scales of the same content (a moved copy is
  fine, other values are not);
* a SIGKILL between best.pt and last.pt (in epoch 1, and in epoch 2, which beats epoch 1) never
  leaves a stale best.pt: the resumed run's best.pt is the uninterrupted run's, weight for weight, and
  the best top-1 it records is the result's;
* stale ``.<name>.<random>.tmp`` files are removed once the run holds its directory's lock.

In-process (``run_hydra``) wherever no real signal is needed; the SIGKILL test runs real processes.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import repopt.faults
from hypersearch.app import main as hs_main
from repopt import get_arch, save_scales
from repopt.engine import load_checkpoint
from repopt.engine.callbacks import Callback, active
from repopt.rundir import flatten
from target_train.app import main as target_main
from tests.faults.helpers import KILLED, model_weights, same_tensors
from tests.helpers.runs import TINY, TINY_STEPS, _all_finite, _env, _RecordEpochCheckpoints, _sha256, read_json, run_hydra

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------ helpers


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _one_error(capsys) -> str:
    """The one ``error:`` line the last run printed on stderr (and no traceback anywhere)."""
    out = capsys.readouterr()
    errors = _errors(out.err)
    assert len(errors) == 1, out.err[-3000:]
    assert "Traceback" not in out.err + out.out, out.err[-3000:]
    return errors[0]


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run but the lock and Hydra's job log (a refused run appends its error line there)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock" and p.suffix != ".log"
    }


def _temporaries(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob(".*.tmp"))


def _scales(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "scales.safetensors")


class _At(Callback):
    """Call ``action(trainer)`` once, after global step ``step``."""

    def __init__(self, step: int, action):
        self.step, self.action, self.done = step, action, False

    def on_step_end(self, trainer) -> None:
        if not self.done and trainer.state.global_step == self.step:
            self.done = True
            self.action(trainer)


@pytest.fixture(scope="module")
def reference_hs(tmp_path_factory, single_thread) -> Path:
    """The tiny stage-one command (TINY: two epochs) run once without any fault."""
    run_dir = tmp_path_factory.mktemp("reference_hs") / "run"
    run_hydra(hs_main, TINY + [f"hydra.run.dir={run_dir}"])
    assert read_json(run_dir / "metrics.json")["status"] == "completed"
    return run_dir


@pytest.fixture(scope="module")
def interrupted_hs(tmp_path_factory, single_thread) -> Path:
    """The tiny stage-one command stopped at step 2 of epoch 1 (last.pt written, status interrupted)."""
    run_dir = tmp_path_factory.mktemp("interrupted_hs") / "run"
    with active(_At(2, lambda trainer: trainer.request_stop())):
        run_hydra(hs_main, TINY + [f"hydra.run.dir={run_dir}"], expect_exit=130)
    assert read_json(run_dir / "metrics.json")["status"] == "interrupted"
    assert load_checkpoint(run_dir / "last.pt")["run"]["global_step"] == 2
    return run_dir


# ------------------------------------------------------------------ 1. a resume on other data is refused

# override, the recorded value the fixtures hold (TINY and the defaults), the line the refusal must print
CHANGES = [
    ("data.synthetic_train_size=256", "data.synthetic_train_size", 128, "data.synthetic_train_size: 128 -> 256"),
    ("data.root=/elsewhere", "data.root", "~/.cache/repopt/data", "data.root: '~/.cache/repopt/data' -> '/elsewhere'"),
    ("data.drop_last=false", "data.drop_last", True, "data.drop_last: True -> False"),
    ("data.random_resized_crop=true", "data.random_resized_crop", False, "data.random_resized_crop: False -> True"),
    ("data.test_subset=16", "data.test_subset", None, "data.test_subset: None -> 16"),
    ("fused_forward=false", "fused_forward", True, "fused_forward: True -> False"),
]
RECORD = ["last.pt", "metrics.json", "history.csv", ".hydra/config.yaml", ".hydra/overrides.yaml"]


def _stage_one_copy(which: str, artifacts, interrupted_hs, tmp_path) -> tuple[Path, list[str]]:
    """A copy of a finished (1 epoch) or interrupted (2 epochs, stopped in epoch 1) tiny stage-one run,
    with the overrides of the command that wrote it."""
    source, epochs = (artifacts["run_dir"], "epochs=1") if which == "finished" else (interrupted_hs, "epochs=2")
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    return run_dir, TINY + [epochs]


@pytest.mark.parametrize("which", ["finished", "interrupted"])
@pytest.mark.parametrize("override,key,recorded,line", CHANGES, ids=[c[1] for c in CHANGES])
def test_resume_on_other_data_is_refused_and_changes_nothing(
    tmp_path, capsys, artifacts, interrupted_hs, which, override, key, recorded, line
):
    run_dir, command = _stage_one_copy(which, artifacts, interrupted_hs, tmp_path)
    assert flatten(read_json(run_dir / "metrics.json")["config"])[key] == recorded  # what the run on disk holds
    files = [name for name in RECORD if (run_dir / name).is_file()]
    assert {"last.pt", "metrics.json", ".hydra/config.yaml", ".hydra/overrides.yaml"} <= set(files)
    before, record = _snapshot(run_dir), {name: (run_dir / name).read_bytes() for name in files}
    capsys.readouterr()

    run_hydra(hs_main, command + ["resume=true", override, f"hydra.run.dir={run_dir}"], expect_exit=1)

    error = _one_error(capsys)
    assert f"other settings ({line});" in error, error  # the changed key and nothing else
    assert {name: (run_dir / name).read_bytes() for name in files} == record
    assert [name for name in RECORD if (run_dir / name).is_file()] == files
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("which", ["finished", "interrupted"])
def test_resume_with_keys_that_change_no_number_is_accepted(tmp_path, capsys, artifacts, interrupted_hs, which):
    run_dir, command = _stage_one_copy(which, artifacts, interrupted_hs, tmp_path)
    scales_before = (run_dir / "scales.safetensors").read_bytes() if which == "finished" else None
    capsys.readouterr()

    run_hydra(hs_main, command + ["resume=true", "progress=bar", "data.num_workers=0", f"hydra.run.dir={run_dir}"])

    out = capsys.readouterr()
    assert _errors(out.err) == [] and "Traceback" not in out.err
    result = read_json(run_dir / "metrics.json")
    assert result["status"] == "completed" and result["epochs"] == (1 if which == "finished" else 2)
    assert result["steps"] == result["epochs"] * TINY_STEPS
    if scales_before is not None:  # the same checkpoint exports the same file, byte for byte
        assert (run_dir / "scales.safetensors").read_bytes() == scales_before


# ------------------------------------------------------------------ 2. a finite loss with a non-finite state diverges


def _poison_running_var(trainer) -> None:
    """NaN in one BN's running variance: train-mode BN normalizes with batch statistics, so the loss stays finite."""
    with torch.no_grad():
        dict(trainer.model.named_buffers())["stage1.0.bn.running_var"][0] = float("nan")


def test_non_finite_bn_statistic_with_a_finite_loss_is_divergence(tmp_path, capsys, reference_hs):
    """NaN written into ``stage1.0.bn.running_var`` after step 6 (epoch 2): every loss stays finite, the
    epoch-2 save finds the NaN. Diverged at step 8, the epoch-1 last.pt kept byte for byte, and a
    resume continues from it to the uninterrupted run's scales."""
    run_dir = tmp_path / "run"
    record = _RecordEpochCheckpoints()
    capsys.readouterr()
    with active(_At(TINY_STEPS + 2, _poison_running_var), record):
        run_hydra(hs_main, TINY + [f"hydra.run.dir={run_dir}"], expect_exit=1)

    error = _one_error(capsys)
    result = read_json(run_dir / "metrics.json")
    assert result["status"] == "diverged", result
    assert type(result["diverged_step"]) is int and result["diverged_step"] == 2 * TINY_STEPS
    assert "stage1.0.bn.running_var" in error and "loss stayed finite" in error, error
    assert "stage1.0.bn.running_var" in result["error"]
    assert list(record.saved) == [0] and _sha256(run_dir / "last.pt") == record.saved[0]
    state = load_checkpoint(run_dir / "last.pt")
    assert state["run"]["epoch"] == 1 and state["run"]["global_step"] == TINY_STEPS
    assert _all_finite(state["model"].values())
    assert not (run_dir / "scales.safetensors").exists()

    run_hydra(hs_main, TINY + ["resume=true", f"hydra.run.dir={run_dir}"])
    out = capsys.readouterr()
    assert _errors(out.err) == [] and "damaged" not in out.err + out.out
    assert read_json(run_dir / "metrics.json")["status"] == "completed"
    assert same_tensors(_scales(run_dir), _scales(reference_hs))


@pytest.mark.parametrize("lr,checkpoint", [("1e4", False), ("1e3", True)])
def test_absurd_learning_rate_blows_up_bn_statistics_not_the_loss(tmp_path, capsys, lr, checkpoint):
    """On the tiny model an absurd lr keeps the loss finite while BN running variances overflow; the
    save at an epoch's end finds it (1e4: end of epoch 1, nothing saved yet; 1e3: end of epoch 2, the
    epoch-1 checkpoint kept). Any last.pt loads with the project's loader, all finite, and a resume
    replays to the same divergence instead of calling the file damaged."""
    run_dir = tmp_path / "run"
    command = TINY + [f"optim.lr={lr}", "sched.warmup_epochs=0", f"hydra.run.dir={run_dir}"]
    capsys.readouterr()
    run_hydra(hs_main, command, expect_exit=1)

    error = _one_error(capsys)
    result = read_json(run_dir / "metrics.json")
    assert result["status"] == "diverged", result
    step = result["diverged_step"]
    assert type(step) is int and step == (2 if checkpoint else 1) * TINY_STEPS, result
    assert "running_var" in error and "loss stayed finite" in error, error
    assert (run_dir / "last.pt").exists() == checkpoint
    if checkpoint:
        state = load_checkpoint(run_dir / "last.pt")  # never a file the loader refuses
        assert state["run"]["epoch"] == 1 and _all_finite(state["model"].values())
        kept = _sha256(run_dir / "last.pt")

    run_hydra(hs_main, command[:-1] + ["resume=true", command[-1]], expect_exit=1)
    error = _one_error(capsys)
    assert "damaged" not in error and "running_var" in error, error
    result = read_json(run_dir / "metrics.json")
    assert result["status"] == "diverged" and result["diverged_step"] == step
    if checkpoint:
        assert _sha256(run_dir / "last.pt") == kept


# ------------------------------------------------------------------ 3. a full disk


def _fill(folder: Path) -> Path:
    """Write zeros into ``folder/filler`` until the device has no space left."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    block = bytes(4096)
    try:
        while True:
            try:
                if os.write(fd, block) == 0:
                    break
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs mounted at ``tmp_path/disk`` (root only); unmounted afterwards in every case."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        for handler in list(logging.root.handlers):  # Hydra's job log, still open on the tmpfs
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(mount):
                logging.root.removeHandler(handler)
                handler.close()
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_full_disk_keeps_the_epoch_1_checkpoint_and_resumes_exactly(small_tmpfs, capsys, reference_hs):
    run_dir = small_tmpfs / "run"
    command = TINY + [f"hydra.run.dir={run_dir}"]
    fillers: list[Path] = []
    record = _RecordEpochCheckpoints(then=lambda trainer: fillers.append(_fill(small_tmpfs)))
    capsys.readouterr()
    with active(record):
        run_hydra(hs_main, command, expect_exit=1)

    assert list(record.saved) == [0] and len(fillers) == 1  # epoch 1 fitted, then the disk was full
    error = _one_error(capsys)
    assert "no space left on the device while writing" in error, error
    assert any(f"writing {run_dir / name}" in error for name in ("last.pt", "history.csv")), error
    assert _sha256(run_dir / "last.pt") == record.saved[0]
    state = load_checkpoint(run_dir / "last.pt")
    assert state["run"]["epoch"] == 1 and _all_finite(state["model"].values())
    assert _temporaries(run_dir) == []
    assert not (run_dir / "scales.safetensors").exists()
    assert read_json(run_dir / "metrics.json")["status"] != "completed"

    fillers[0].unlink()
    run_hydra(hs_main, command[:-1] + ["resume=true", command[-1]])
    assert read_json(run_dir / "metrics.json")["status"] == "completed"
    assert same_tensors(_scales(run_dir), _scales(reference_hs))
    assert _temporaries(run_dir) == []


def test_injected_enospc_on_the_scales_export_fails_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REPOPT_FAULT", "write:scales.safetensors:enospc")
    monkeypatch.setattr(repopt.faults, "_passes", {})  # the first pass in this test, whatever ran before
    run_dir = tmp_path / "run"
    capsys.readouterr()
    run_hydra(hs_main, TINY + ["epochs=1", f"hydra.run.dir={run_dir}"], expect_exit=1)

    error = _one_error(capsys)
    assert "no space left" in error and "scales.safetensors" in error, error
    result = read_json(run_dir / "metrics.json")
    assert result["status"] == "failed", result
    assert "no space left" in result["error"] and not result.get("manifest")
    assert not (run_dir / "scales.safetensors").exists()
    assert _temporaries(run_dir) == []


# ------------------------------------------------------------------ 4. a damaged stage-one scales file


@pytest.fixture
def flipped_run(artifacts, tmp_path) -> Path:
    """A copy of the finished stage-one run whose scales file has one bit flipped (still a valid file)."""
    run_copy = tmp_path / "hs"
    shutil.copytree(artifacts["run_dir"], run_copy)
    scales = run_copy / "scales.safetensors"
    data = bytearray(scales.read_bytes())
    data[-1] ^= 0x01
    scales.write_bytes(bytes(data))
    assert load_file(scales).keys() == load_file(artifacts["run_dir"] / "scales.safetensors").keys()
    return run_copy


@pytest.mark.parametrize("by", ["directory", "file"])
def test_stage_two_refuses_a_flipped_bit_in_a_stage_one_runs_scales(tmp_path, capsys, flipped_run, by):
    spec = flipped_run if by == "directory" else flipped_run / "scales.safetensors"
    run_dir = tmp_path / "target"
    capsys.readouterr()
    run_hydra(target_main, TINY + ["epochs=1", f"scales={spec}", f"hydra.run.dir={run_dir}"], expect_exit=1)

    error = _one_error(capsys)
    assert "differs from the file its stage-one run wrote" in error, error
    assert str(flipped_run / "scales.safetensors") in error
    assert not (run_dir / "last.pt").exists()
    assert read_json(run_dir / "metrics.json")["status"] == "failed"


def test_stage_two_trains_with_an_unflipped_copy(tmp_path, capsys, artifacts):
    run_copy = tmp_path / "hs"
    shutil.copytree(artifacts["run_dir"], run_copy)
    run_dir = tmp_path / "target"
    run_hydra(target_main, TINY + ["epochs=1", f"scales={run_copy}", f"hydra.run.dir={run_dir}"])
    result = read_json(run_dir / "metrics.json")
    assert result["status"] == "completed"
    assert result["scales"]["sha256"] == read_json(artifacts["run_dir"] / "metrics.json")["scales_sha256"]


# ------------------------------------------------------------------ 5. stage two resumes only with the same scales


def test_stage_two_resumes_only_with_scales_of_the_same_content(tmp_path, capsys, artifacts):
    a = artifacts["scales_safetensors"]
    moved = tmp_path / "moved" / "a.safetensors"
    moved.parent.mkdir()
    shutil.copyfile(a, moved)
    b = save_scales(tmp_path / "b.safetensors", {k: v * 1.5 for k, v in get_arch("tiny").init_scales().items()}).path
    run_dir = tmp_path / "target"
    run_hydra(target_main, TINY + ["epochs=1", f"scales={a}", f"hydra.run.dir={run_dir}"])
    first = read_json(run_dir / "metrics.json")
    assert first["status"] == "completed"
    weights = model_weights(run_dir / "last.pt")

    # the same content at another path: accepted, and the run it continues is unchanged
    capsys.readouterr()
    run_hydra(target_main, TINY + ["epochs=1", "resume=true", f"scales={moved}", f"hydra.run.dir={run_dir}"])
    assert _errors(capsys.readouterr().err) == []
    again = read_json(run_dir / "metrics.json")
    assert again["status"] == "completed" and again["scales"]["sha256"] == first["scales"]["sha256"]
    assert again["top1"] == first["top1"] and same_tensors(model_weights(run_dir / "last.pt"), weights)

    # other values: refused, naming what differs
    last = (run_dir / "last.pt").read_bytes()
    run_hydra(target_main, TINY + ["epochs=1", "resume=true", f"scales={b}", f"hydra.run.dir={run_dir}"], expect_exit=1)
    error = _one_error(capsys)
    assert "scales_identity" in error, error
    assert (run_dir / "last.pt").read_bytes() == last
    assert read_json(run_dir / "metrics.json")["status"] == "completed"  # the finished run's result stands


# ------------------------------------------------------------------ 6. best.pt is never stale


def _target_command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "target_train", *TINY, "epochs=2", "scales=init", *extra, f"hydra.run.dir={run_dir}"]


def _spawn(run_dir: Path, *extra: str, fault: str | None = None) -> subprocess.Popen:
    env = _env(threads=1)
    env.pop("REPOPT_FAULT", None)
    if fault:
        env["REPOPT_FAULT"] = fault
    return subprocess.Popen(
        _target_command(run_dir, *extra), cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


@pytest.fixture(scope="module")
def reference_target(tmp_path_factory) -> Path:
    """The stage-two command (two epochs from the init scales) run once, never interrupted. Epoch 2
    beats epoch 1 on the test set, so its best.pt is epoch 2's."""
    run_dir = tmp_path_factory.mktemp("reference_target") / "run"
    rc, err = _finish(_spawn(run_dir))
    assert rc == 0, err[-2000:]
    history = pd.read_csv(run_dir / "history.csv")
    assert history["test_top1"].iloc[1] > history["test_top1"].iloc[0], history
    return run_dir


# fault, the epoch whose best.pt the kill leaves, the epoch last.pt then holds (None: no last.pt yet)
KILLS = [("best.before_last", 1, None), ("best.before_last@2", 2, 1)]


@pytest.mark.parametrize("fault,best_epoch,last_epoch", KILLS, ids=["epoch1", "epoch2"])
def test_a_kill_between_best_and_last_never_leaves_a_stale_best(tmp_path, reference_target, fault, best_epoch, last_epoch):
    """SIGKILL after best.pt is written and before last.pt is: the resume replays that epoch (its
    last.pt is the previous one) and writes both again, so the final best.pt is the best epoch's."""
    run_dir = tmp_path / "run"
    rc, err = _finish(_spawn(run_dir, fault=f"{fault}:kill"))
    assert rc == KILLED, err[-2000:]
    assert load_checkpoint(run_dir / "best.pt")["run"]["epoch"] == best_epoch
    if last_epoch is None:
        assert not (run_dir / "last.pt").exists()
    else:
        assert load_checkpoint(run_dir / "last.pt")["run"]["epoch"] == last_epoch
    assert read_json(run_dir / "metrics.json")["status"] != "completed"

    rc, err = _finish(_spawn(run_dir, "resume=true"))
    assert rc == 0, err[-2000:]

    result, reference = read_json(run_dir / "metrics.json"), read_json(reference_target / "metrics.json")
    assert result["status"] == "completed" and result["epochs"] == 2
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    assert best["run"]["best_top1"] == result["best_top1"] == reference["best_top1"]
    assert best["run"]["epoch"] == 2  # the best epoch (see reference_target), not the one the kill left
    assert same_tensors(best["model"], model_weights(reference_target / "best.pt"))
    assert same_tensors(model_weights(run_dir / "last.pt"), model_weights(reference_target / "last.pt"))
    assert _temporaries(run_dir) == []


# ------------------------------------------------------------------ 7. stale temporary files


def test_stale_temporary_files_are_removed_under_the_lock(tmp_path, artifacts):
    run_dir = tmp_path / "run"
    shutil.copytree(artifacts["run_dir"], run_dir)
    stale = run_dir / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint left by a killed write")
    last = (run_dir / "last.pt").read_bytes()
    run_hydra(hs_main, TINY + ["epochs=1", "resume=true", f"hydra.run.dir={run_dir}"])
    assert not stale.exists()
    assert _temporaries(run_dir) == []
    assert (run_dir / "last.pt").read_bytes() == last  # nothing left to train: the checkpoint is not rewritten
    assert read_json(run_dir / "metrics.json")["status"] == "completed"
