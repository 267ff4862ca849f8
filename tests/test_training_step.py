"""One training step: the trainer, target_train.equivalence and the benchmark all run ``TrainStep``;
and the trainer's public seams (callbacks, request_stop)."""

from __future__ import annotations

import json

import pytest
import torch

from hypersearch.app import main as hs_main
from pipelines.benchmark import main as bench_main
from repopt.engine import Callback, TrainStep, active
from repopt.engine.runtime import Runtime
from target_train.equivalence import run_equivalence
from tests.helpers.runs import TINY, read_json, run_hydra

STEPS_PER_EPOCH = 128 // 32  # TINY: 128 training images, batch 32


@pytest.fixture
def counted(monkeypatch):
    """Count the calls of TrainStep.__call__ (the one step function) while it still runs."""
    calls = []
    original = TrainStep.__call__

    def call(self, x, y):
        calls.append(self)
        return original(self, x, y)

    monkeypatch.setattr(TrainStep, "__call__", call)
    return calls


class Recorder(Callback):
    def __init__(self):
        self.steps, self.epochs = [], []

    def on_step_end(self, trainer):
        self.steps.append(trainer.state.global_step)
        if trainer.state.global_step == STEPS_PER_EPOCH + 1:
            trainer.request_stop()

    def on_epoch_end(self, trainer, row):
        self.epochs.append((row["epoch"], trainer.last_path.is_file()))


def test_the_trainer_runs_train_step_and_calls_back(in_tmp, counted):
    run_dir = in_tmp / "run"
    recorder = Recorder()
    with active(recorder):
        run_hydra(hs_main, TINY + [f"hydra.run.dir={run_dir}"], expect_exit=130)  # request_stop: interrupted
    assert len(counted) == STEPS_PER_EPOCH + 1 and len({id(s) for s in counted}) == 1
    assert recorder.steps == list(range(1, STEPS_PER_EPOCH + 2))
    assert recorder.epochs == [(1, True)]  # called after the epoch's checkpoint was written
    assert read_json(run_dir / "metrics.json")["status"] == "interrupted"
    run_hydra(hs_main, TINY + ["resume=true", f"hydra.run.dir={run_dir}"])  # no callback outside the block
    assert len(recorder.steps) == STEPS_PER_EPOCH + 1


def test_verify_trains_both_models_with_train_step(counted):
    result = run_equivalence("tiny", "sgd", steps=3, dtype=torch.float64)
    assert len(counted) == 6 and result.passed(1e-10)


def test_benchmark_times_train_step(tmp_path, counted):
    threads = torch.get_num_threads()  # --threads sets the process's torch threads
    out = tmp_path / "bench.json"
    assert (
        bench_main(
            [
                "--device",
                "cpu",
                "--arch",
                "tiny",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--hs-images",
                "128",
                "--hs-batch",
                "64",
                "--resolution",
                "16",
                "--batch",
                "4",
                "--num-classes",
                "10",
                "--threads",
                "1",
                "--sections",
                "train,hs_epoch",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    torch.set_num_threads(threads)
    sections = json.loads(out.read_text())["sections"]
    # train: one untimed set-up step, then per model warm-up + timed steps; hs_epoch: warm-up + one epoch
    train_calls = 1 + len(sections["train"]["rows"]) * (1 + 2)
    hs_calls = 1 + 128 // 64
    assert len(counted) >= train_calls + hs_calls


def test_fp16_step_scales_the_loss_and_bf16_does_not():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cpu = torch.device("cpu")
    assert TrainStep(model, opt, Runtime(cpu, torch.float16, False)).scaler is not None
    assert TrainStep(model, opt, Runtime(cpu, torch.bfloat16, False)).scaler is None


def test_train_step_is_sgd_by_hand():
    """One step equals forward, cross-entropy, backward and the optimizer step written out."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3).double(), torch.nn.Linear(5, 3).double()
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    step = TrainStep(a, torch.optim.SGD(a.parameters(), lr=0.5), Runtime(torch.device("cpu"), None, False), label_smoothing=0.1)
    loss, logits = step(x, y)
    expected = torch.nn.functional.cross_entropy(b(x), y, label_smoothing=0.1)
    expected.backward()
    with torch.no_grad():
        for p in b.parameters():
            p -= 0.5 * p.grad
    assert torch.equal(loss, expected.detach()) and not loss.requires_grad and not logits.requires_grad
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
