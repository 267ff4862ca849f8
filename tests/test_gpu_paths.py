"""Every CUDA path of the project, run for real (``pytest -m gpu``; ``bash scripts/gpu_check.sh`` runs them).

Each test runs on CUDA and is skipped where CUDA is not available, unless
``REPOPT_GPU_CHECK_DEVICE=cpu`` asks for the CPU: then the same code runs on the CPU, so the file is
exercised before it ever meets a GPU (``python -m pipelines.gpu_check --device cpu --quick`` sets the
variable). Where a path is CUDA-only, its CPU stand-in is named in the test's docstring.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from repopt import get_arch
from repopt.config import DataConfig
from repopt.data import build_data
from repopt.engine import Runtime, TrainStep, load_checkpoint
from repopt.engine.callbacks import Callback, active
from repopt.engine.runtime import resolve_compile_mode
from repopt.scales import random_scales
from tests.helpers.runs import _env, read_json, run_hydra

DEVICE_VARIABLE = "REPOPT_GPU_CHECK_DEVICE"

pytestmark = pytest.mark.gpu


def _device() -> torch.device | None:
    """CUDA where present; the CPU when ``REPOPT_GPU_CHECK_DEVICE=cpu``; None (skip) otherwise."""
    asked = os.environ.get(DEVICE_VARIABLE, "").strip().lower()
    if asked == "cpu":
        return torch.device("cpu")
    if asked not in ("", "cuda"):
        raise pytest.UsageError(f"{DEVICE_VARIABLE}={asked!r}: use cuda or cpu (or leave it unset)")
    return torch.device("cuda", 0) if torch.cuda.is_available() else None


@pytest.fixture(scope="module")
def device() -> torch.device:
    dev = _device()
    if dev is None:
        pytest.skip(f"needs CUDA (or {DEVICE_VARIABLE}=cpu to run the same code on the CPU)")
    return dev


def _on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _tiny(device: torch.device, steps: int = 16, batch: int = 32) -> list[str]:
    """A tiny run on synthetic data on ``device``: ``steps`` training steps per epoch."""
    return [
        "arch=tiny",
        "arch.strides=[1,2,2,2,1]",
        "data=synthetic",
        f"data.batch_size={batch}",
        f"data.synthetic_train_size={steps * batch}",
        "data.synthetic_test_size=64",
        "sched.warmup_epochs=0.5",
        "progress=off",
        f"device={device}",
    ]


# ------------------------------------------------------------------------ compiled HS training
class _CompileCounter(Callback):
    """Dynamo's compile counters after each step: a recompile after warm-up shows up as growth."""

    def __init__(self):
        self.after: list[dict] = []

    def on_step_end(self, trainer) -> None:
        from torch._dynamo.utils import counters

        self.after.append(
            {
                "frames": sum(counters["frames"].values()),
                "graphs": counters["stats"]["unique_graphs"],
                "recompiles": sum(counters["recompiles"].values()),
            }
        )


def test_compiled_hs_training_matches_eager_and_never_recompiles(device, tmp_path, monkeypatch):
    """Stage one with ``compile=true compile_mode=auto`` (CUDA graphs, ``reduce-overhead``, on one
    GPU with drop_last) trains 3 epochs of 16 steps like the eager run: every epoch's mean train
    loss and the final test loss within 1 % (fp32, no AMP: the two runs then differ only by kernel
    rounding), and after the first epoch's warm-up dynamo compiles nothing more (frames, graphs and
    recompiles stay put, through two evaluations in between). CPU stand-in: ``auto`` resolves to
    torch.compile's default mode (no CUDA graphs)."""
    from hypersearch.app import main as hs_main

    monkeypatch.chdir(tmp_path)
    expected_mode = "reduce-overhead" if _on_cuda(device) else None
    assert resolve_compile_mode("auto", device, 1, True) == expected_mode
    common = _tiny(device) + ["epochs=3", "amp=off", "optim.lr=0.05"]
    run_hydra(hs_main, common + ["compile=false", f"hydra.run.dir={tmp_path / 'eager'}"])
    torch._dynamo.reset()
    counter = _CompileCounter()
    with active(counter):
        run_hydra(hs_main, common + ["compile=true", "compile_mode=auto", f"hydra.run.dir={tmp_path / 'compiled'}"])
    eager, compiled = (pd.read_csv(tmp_path / d / "history.csv") for d in ("eager", "compiled"))
    assert len(eager) == len(compiled) == 3
    rel = ((compiled["train_loss"] - eager["train_loss"]).abs() / eager["train_loss"].abs()).max()
    assert rel <= 1e-2, (eager["train_loss"].tolist(), compiled["train_loss"].tolist())
    assert eager["train_loss"].iloc[-1] < eager["train_loss"].iloc[0]  # it trained: the comparison is not vacuous
    m_eager, m_compiled = read_json(tmp_path / "eager" / "metrics.json"), read_json(tmp_path / "compiled" / "metrics.json")
    assert m_eager["status"] == m_compiled["status"] == "completed"
    assert abs(m_compiled["loss"] - m_eager["loss"]) <= 1e-2 * abs(m_eager["loss"]), (m_eager["loss"], m_compiled["loss"])
    assert len(counter.after) == 48 and counter.after[0]["graphs"] >= 1, counter.after[:2]
    warm = counter.after[15]  # the end of epoch 1 (compilation and graph recording are done)
    assert counter.after[-1] == warm, (warm, counter.after[-1])


# ------------------------------------------------------------------------ bf16 + channels_last target step
def _flat(tensors: dict) -> torch.Tensor:
    return torch.cat([t.flatten().float() for t in tensors.values()])


def test_bf16_channels_last_target_step_matches_fp32_step(device):
    """One stage-two step (RepOpt-VGG target re-initialized from scales, masked ``RepOptSGD``, the
    trainer's ``TrainStep``) three ways: fp32 contiguous (the reference), fp32 channels_last, and bf16
    autocast with channels_last (what a CUDA run does). channels_last alone changes nothing beyond
    rounding (loss and whole update within 1e-4); under bf16 the logits really are bf16, the weights
    stay fp32 and channels_last, the loss is within 1e-2 of fp32's and the update within 30 % of the
    fp32 update's norm with a cosine >= 0.95 (bf16's 8-bit mantissa: 12 % was measured on the CPU; a
    missing or wrong mask moves whole layers by their mask factor, far outside that). On the CPU the
    same autocast and memory format run on the CPU kernels."""
    from repopt.setup import place
    from target_train import build_repopt, build_target_model

    arch = get_arch("tiny", [1, 2, 2, 2, 1])
    scales = random_scales(arch, 0, signed=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (32,), generator=g).to(device)
    runs = {}
    for name, amp, cl in (("fp32", None, False), ("fp32_cl", None, True), ("bf16_cl", torch.bfloat16, True)):
        torch.manual_seed(0)
        runtime = Runtime(device, amp, cl)
        model = place(build_target_model(arch, 10), runtime)
        opt = build_repopt(model, scales, "sgd", lr=0.1, weight_decay=4e-5)
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        loss, logits = TrainStep(model, opt, runtime)(x, y)
        update = {k: v.detach() - before[k] for k, v in model.named_parameters()}
        runs[name] = {"loss": float(loss), "dtype": logits.dtype, "model": model, "update": _flat(update)}
    ref = runs["fp32"]
    assert ref["dtype"] == runs["fp32_cl"]["dtype"] == torch.float32 and runs["bf16_cl"]["dtype"] == torch.bfloat16
    assert float(ref["update"].norm()) > 0  # the step moved the weights
    for name, loss_tol, update_tol in (("fp32_cl", 1e-4, 1e-4), ("bf16_cl", 1e-2, 0.3)):
        run = runs[name]
        assert abs(run["loss"] - ref["loss"]) <= loss_tol * abs(ref["loss"]), (name, ref["loss"], run["loss"])
        rel = float((run["update"] - ref["update"]).norm() / ref["update"].norm())
        assert rel <= update_tol, (name, rel)
        w = run["model"].stage1[0].conv.weight
        assert w.dtype == torch.float32 and w.is_contiguous(memory_format=torch.channels_last), name
    cosine = float(F.cosine_similarity(runs["bf16_cl"]["update"], ref["update"], dim=0))
    assert cosine >= 0.95, cosine


# ------------------------------------------------------------------------ the device loader
@pytest.mark.parametrize("world_size", [1, 2])
def test_device_loader_yields_the_cpu_batches(device, world_size):
    """The device loader (uint8 images on the device, crop/flip/normalize there) yields bit for bit
    the batches it yields on the CPU with the same seed: a whole epoch, a resumed epoch (start=3)
    and each rank's slice of a 2-rank run. On the CPU both sides are the CPU (the path still runs)."""
    cfg = DataConfig(
        name="synthetic",
        synthetic_train_size=1000,
        synthetic_test_size=100,
        batch_size=96,
        loader="device",
        crop_padding=4,
        hflip=True,
        drop_last=True,
        image_size=32,
    )
    for rank in range(world_size):
        on_device = build_data(cfg, device, seed=7, rank=rank, world_size=world_size)
        on_cpu = build_data(cfg, "cpu", seed=7, rank=rank, world_size=world_size)
        assert len(on_device.train) == len(on_cpu.train) == 1000 // 96
        for epoch, start in ((0, 0), (1, 3)):
            n = 0
            for (xd, yd), (xc, yc) in zip(on_device.train.epoch(epoch, start), on_cpu.train.epoch(epoch, start)):
                assert xd.device.type == device.type and xd.dtype == torch.float32
                assert torch.equal(xd.cpu(), xc) and torch.equal(yd.cpu(), yc), (epoch, start, n)
                n += 1
            assert n == len(on_cpu.train) - start
        for (xd, yd), (xc, yc) in zip(on_device.test.epoch(0), on_cpu.test.epoch(0)):
            assert torch.equal(xd.cpu(), xc) and torch.equal(yd.cpu(), yc)
    # and the epochs differ (the comparison is not of constant batches)
    first = [next(iter(on_cpu.train.epoch(e)))[0] for e in (0, 1)]
    assert not torch.equal(first[0], first[1])


# ------------------------------------------------------------------------ RepOptSGD(compiled=True)
def test_compiled_repoptsgd_equals_eager_step(device):
    """``RepOptSGD(compiled=True)`` on the device equals the eager masked step within 1e-6 (relative
    to each tensor's largest value) over 8 steps with the same gradients and an lr that changes
    every step, and compiles once: the lr is a tensor, so the schedule recompiles nothing."""
    from torch._dynamo.utils import counters

    from target_train import build_target_model, grad_masks, masks_by_param, param_groups
    from target_train.optim import RepOptSGD

    arch = get_arch("tiny", [1, 2, 2, 2, 1])
    scales = random_scales(arch, 3, signed=True)
    torch.manual_seed(0)
    base = build_target_model(arch, 10).to(device)
    models = [copy.deepcopy(base) for _ in range(2)]
    opts = [
        RepOptSGD(
            param_groups(m, 1e-3),
            masks_by_param(m, grad_masks(m, scales)),
            lr=0.05,
            momentum=0.9,
            nesterov=True,
            compiled=compiled,
        )
        for m, compiled in zip(models, (False, True))
    ]
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    graphs = []
    for step in range(8):
        grads = [torch.randn(p.shape, generator=g).to(device) for p in base.parameters()]
        for model, opt in zip(models, opts):
            for group in opt.param_groups:
                group["lr"] = 0.05 / (1 + step)
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
            opt.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs
    worst = 0.0
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        if a.is_floating_point():
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
    assert worst <= 1e-6, worst
    moved = max(float((a - b).abs().max()) for a, b in zip(models[0].parameters(), base.parameters()))
    assert moved > 1e-3


# ------------------------------------------------------------------------ DDP
def test_one_process_ddp_step_equals_plain_training(device, tmp_path):
    """A real process group (NCCL on CUDA; the CPU stand-in is gloo) of one process, the target
    model as ``place`` prepares it for DDP (global-batch BN: torch's SyncBatchNorm on CUDA) wrapped
    in ``DistributedDataParallel`` and trained with the masked ``RepOptSGD`` through ``TrainStep``
    for 6 steps: the weights equal those of plain single-process training within 1e-4 (the all-reduce
    of one rank averages over one). One GPU cannot hold two NCCL ranks, so the apps' own DDP wrap
    (world size > 1) is proven on the CPU by tests/test_ddp.py."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from repopt.engine.sync_bn import sync_batch_norm
    from target_train import build_optimizer, build_target_model, reinitialize

    backend = "nccl" if _on_cuda(device) else "gloo"
    if not dist.is_available() or (backend == "nccl" and not dist.is_nccl_available()):
        pytest.fail(f"torch.distributed with {backend} is not available in this torch build")
    arch = get_arch("tiny", [1, 2, 2, 2, 1])
    scales = random_scales(arch, 0, signed=False)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        assert dist.get_backend() == backend
        runtime = Runtime(device, None, False)
        models = []
        for wrap in (False, True):
            torch.manual_seed(0)
            model = build_target_model(arch, 10)
            reinitialize(model, scales, use_identity_scales=True)  # the app's order: re-init, then place, then optimizer
            if wrap:
                model = sync_batch_norm(model, device)
            model = model.to(device)
            opt = build_optimizer(model, "sgd", 0.1, 4e-5, scales=scales)
            forward = DDP(model, device_ids=[device.index] if _on_cuda(device) else None) if wrap else model
            models.append((model, TrainStep(forward, opt, runtime)))
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in models[1][0].modules()) == _on_cuda(device)
        g = torch.Generator().manual_seed(2)
        for _ in range(6):
            x, y = torch.randn(32, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (32,), generator=g).to(device)
            losses = [float(step(x, y)[0]) for _, step in models]
            assert abs(losses[0] - losses[1]) <= 1e-4 * abs(losses[0]), losses
        (plain, _), (ddp, _) = models
        for (name, a), b in zip(plain.state_dict().items(), ddp.state_dict().values()):
            if a.is_floating_point():
                assert float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) <= 1e-4, name
        assert (
            float((plain.stage1[0].conv.weight - build_target_model(arch, 10).to(device).stage1[0].conv.weight).abs().max()) > 0
        )
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------ SIGTERM and resume
def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def test_sigterm_then_resume_on_device_equals_uninterrupted_run(device, tmp_path):
    """A real ``python -m hypersearch`` process on the device gets SIGTERM once epoch 1 has written
    ``last.pt``; it checkpoints at the step boundary and exits 130, and ``resume=true`` then finishes
    with the history, metrics and scales of an uninterrupted run of the same command (exactly, with
    ``deterministic=true``; on CUDA with deterministic cuBLAS workspaces). On CUDA bf16 autocast and
    channels_last are on (the defaults there)."""
    from repopt import load_scales

    steps = 96 if _on_cuda(device) else 16  # a GPU epoch must still be long enough to be caught mid-way
    command = [
        sys.executable,
        "-m",
        "hypersearch",
        *_tiny(device, steps=steps, batch=16),
        "data.image_size=16",
        "epochs=3",
        "deterministic=true",
    ]
    env = dict(_env(), CUBLAS_WORKSPACE_CONFIG=":4096:8")
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    ref = subprocess.run(
        command + [f"hydra.run.dir={reference}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    with open(tmp_path / "interrupted.out", "wb") as out:
        proc = subprocess.Popen(
            command + [f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            _wait_until(lambda: (run_dir / "last.pt").exists() or proc.poll() is not None, timeout=240)
            assert proc.poll() is None, "the run ended before it could be stopped:\n" + (tmp_path / "interrupted.out").read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=240) == 130, (tmp_path / "interrupted.out").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert read_json(run_dir / "metrics.json")["status"] == "interrupted"
    run = load_checkpoint(run_dir / "last.pt")["run"]
    assert run["epoch"] in (1, 2) and run["global_step"] < 3 * steps, run
    resumed = subprocess.run(
        command + [f"hydra.run.dir={run_dir}", "resume=true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    done, full = read_json(run_dir / "metrics.json"), read_json(reference / "metrics.json")
    assert done["status"] == full["status"] == "completed"
    assert done["device"] == full["device"] and ("cpu" in done["device"]) != _on_cuda(device)
    for key in ("top1", "top5", "loss", "best_top1", "epochs", "steps"):
        assert done[key] == full[key], (key, done[key], full[key])
    columns = ["epoch_seconds", "images_per_sec"]
    pd.testing.assert_frame_equal(
        pd.read_csv(run_dir / "history.csv").drop(columns=columns), pd.read_csv(reference / "history.csv").drop(columns=columns)
    )
    a, b = load_scales(run_dir, get_arch("tiny")), load_scales(reference, get_arch("tiny"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------ export
def test_export_of_a_device_trained_run(device, tmp_path, monkeypatch):
    """A stage-two run trained on the device (bf16 and channels_last on CUDA; checkpoints hold device
    tensors) folds and exports: ONNX Runtime's FP32 logits match PyTorch's (within 1e-4), the FP32
    ONNX top-1 equals the run's own test top-1 within 3 of the 64 test images (the run evaluated in
    bf16 on CUDA, the export in FP32), and the INT8 model is written and evaluated."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from target_train.app import main as target_main
    from target_train.export import main as export_main

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "target"
    run_hydra(target_main, _tiny(device, steps=4) + ["epochs=1", "scales=init", f"hydra.run.dir={run_dir}"])
    ckpt = load_checkpoint(run_dir / "best.pt")
    assert ckpt["config"]["device"] == str(device)
    assert (run_dir / "deploy.pt").is_file()
    run_hydra(export_main, [f"run={run_dir}", "calibration_images=64", "latency_runs=3", "latency_warmup=1", "threads=1"])
    quant, metrics = read_json(run_dir / "quant.json"), read_json(run_dir / "metrics.json")
    assert quant["onnx_fp32_max_rel_diff"] <= 1e-4, quant["onnx_fp32_max_rel_diff"]
    assert quant["fp32_top1"] == pytest.approx(metrics["top1"], abs=3 * 100.0 / quant["eval_images"] + 1e-9)
    assert 0.0 <= quant["int8_top1"] <= 100.0 and Path(run_dir / "model.int8.onnx").is_file()
