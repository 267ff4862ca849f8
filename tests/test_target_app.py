"""Stage two end to end: every scales= form, the RepVGG baseline, deploy.pt, re-init, bad input."""

import pytest
import torch

from hypersearch.app import main as hs_main
from repopt import get_arch, load_scales
from repopt.config import to_typed
from repopt.engine import load_checkpoint
from repopt.host import seed_everything
from repopt.io import sha256_file
from repopt.vgg import RepOptVGG
from target_train import build_target_model, grad_masks, reinitialize
from target_train.app import main as target_main
from target_train.config import TargetConfig
from target_train.optim import RepOptSGD
from target_train.train import build_target_run
from tests.helpers.runs import TINY, logits_without_the_project, read_json, run_hydra

TARGET_FILES = ["metrics.json", "history.csv", "last.pt", "best.pt", "deploy.pt", ".hydra/config.yaml"]
ARCH = get_arch("tiny", [1, 2, 2, 2, 1])


@pytest.fixture(scope="module")
def hs_run(tmp_path_factory):
    """One finished stage-one run to take scales from."""
    run_dir = tmp_path_factory.mktemp("hs") / "run"
    run_hydra(hs_main, TINY + ["epochs=1", f"hydra.run.dir={run_dir}"])
    return run_dir


def _train(run_dir, *overrides):
    run_hydra(target_main, TINY + list(overrides) + [f"hydra.run.dir={run_dir}"])
    missing = [f for f in TARGET_FILES if not (run_dir / f).is_file()]
    assert not missing, missing
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "completed" and 0 <= metrics["top1"] <= 100
    assert metrics["deploy_max_rel_diff"] <= 1e-4
    return metrics


def test_scales_from_file_and_run_dir(tmp_path, hs_run):
    file_metrics = _train(tmp_path / "file", f"scales={hs_run / 'scales.safetensors'}")
    dir_metrics = _train(tmp_path / "dir", f"scales={hs_run}")
    sha = sha256_file(hs_run / "scales.safetensors")
    for m in (file_metrics, dir_metrics):
        assert m["optimizer"] == "RepOptSGD"
        assert m["scales"]["sha256"] == sha and m["scales"]["kind"] == "file"
        assert m["scales"]["path"] == str(hs_run / "scales.safetensors")
        assert "source_run" not in m["scales"]["metadata"]  # the file's bytes do not depend on where its run lies
    # same scales, same seed, same data: the two forms train identically
    assert file_metrics["top1"] == dir_metrics["top1"] and file_metrics["loss"] == dir_metrics["loss"]


@pytest.mark.parametrize("scales,optimizer", [("none", "SGD"), ("init", "RepOptSGD")])
def test_baselines_none_and_init(tmp_path, scales, optimizer):
    metrics = _train(tmp_path / scales, f"scales={scales}")
    assert metrics["optimizer"] == optimizer and metrics["scales"]["kind"] == scales


def test_repvgg_baseline(tmp_path):
    metrics = _train(tmp_path / "repvgg", "model=repvgg", "scales=none")
    assert metrics["model"] == "repvgg" and metrics["optimizer"] == "SGD"
    state = load_checkpoint(tmp_path / "repvgg" / "last.pt")
    assert any("rbr_1x1" in k for k in state["model"])


def test_repvgg_never_reads_the_default_scales(tmp_path):
    """``model=repvgg arch=tiny`` used to fail on the default scales=official:B1 (made for B1), which it never uses."""
    run_dir = tmp_path / "repvgg"
    metrics = _train(run_dir, "model=repvgg")
    assert metrics["model"] == "repvgg" and metrics["optimizer"] == "SGD" and metrics["scales"]["kind"] == "none"
    assert "scales=official is not used" in (run_dir / "app.log").read_text()


def test_repvgg_with_explicit_unused_scales_warns_and_reads_nothing(tmp_path):
    run_dir = tmp_path / "repvgg"
    missing = tmp_path / "nowhere" / "scales.safetensors"  # would be an error if it were read
    metrics = _train(run_dir, "model=repvgg", f"scales={missing}")
    assert metrics["scales"]["kind"] == "none"
    assert f"scales={missing} is not used" in (run_dir / "app.log").read_text()


def test_official_scales_b1(tmp_path):
    """The shipped official file drives a (one-step) B1 run."""
    run_dir = tmp_path / "official"
    run_hydra(
        target_main,
        [
            "arch=B1",
            "data=synthetic",
            "data.batch_size=8",
            "data.synthetic_train_size=16",
            "data.synthetic_test_size=8",
            "data.image_size=32",
            "epochs=1",
            "sched.warmup_epochs=0",
            "max_steps_per_epoch=1",
            "progress=off",
            "device=cpu",
            "deploy=false",
            "scales=official:B1",
            f"hydra.run.dir={run_dir}",
        ],
    )
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "completed" and metrics["scales"]["kind"] == "official"
    assert metrics["scales"]["path"].endswith("RepOpt-VGG-B1-scales.pth")


def test_deploy_reloads_without_the_project(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "scales=init")
    ckpt = load_checkpoint(run_dir / "last.pt")
    model = RepOptVGG(get_arch(ARCH.from_dict(ckpt["arch"])), ckpt["num_classes"], mode="target")
    model.load_state_dict(ckpt["model"])
    model.eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    out = logits_without_the_project(run_dir / "deploy.pt", x, tmp_path)
    assert out.shape == (5, 10)
    assert float((out - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_app_starts_from_the_reinitialized_weights_and_uses_the_masks(tmp_path, hs_run):
    """One step at lr 0 (the warm-up's first step) leaves the conv weights at their start: they must
    equal the foundation API's re-init."""
    run_dir = tmp_path / "lr0"
    run_hydra(
        target_main,
        TINY
        + [
            "epochs=1",
            "sched.warmup_epochs=1",
            "sched.warmup_start_factor=0",
            "max_steps_per_epoch=1",
            f"scales={hs_run}",
            "deploy=false",
            f"hydra.run.dir={run_dir}",
        ],
    )
    scales = load_scales(hs_run, ARCH)
    seed_everything(0)
    expected = reinitialize(build_target_model(ARCH, 10), scales)
    state = load_checkpoint(run_dir / "last.pt")["model"]
    convs = [k for k in state if k.endswith("conv.weight")]
    assert len(convs) == len(ARCH.blocks)
    for key in convs:
        assert torch.equal(state[key], expected.state_dict()[key]), key
    # and the optimizer the app builds is the RepOptimizer with exactly those masks
    cfg = to_typed(
        {
            "arch": {"name": "tiny", "strides": [1, 2, 2, 2, 1]},
            "data": {"name": "synthetic", "batch_size": 32, "synthetic_train_size": 128, "synthetic_test_size": 64},
            "scales": str(hs_run),
            "device": "cpu",
            "epochs": 1,
            "sched": {"warmup_epochs": 0},
        },
        TargetConfig,
    )
    run = build_target_run(cfg, tmp_path / "inspect")
    assert isinstance(run.optimizer, RepOptSGD)
    names = {id(p): n for n, p in run.model.named_parameters()}
    reference = grad_masks(run.model, scales, rule="sgd")
    assert {names[id(p)] for p in run.optimizer.grad_masks} == set(reference)
    for p, mask in run.optimizer.grad_masks.items():
        assert torch.equal(mask, reference[names[id(p)]])


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["scales=official:B1"], "does not fit arch tiny"),
        (["scales=/nonexistent/scales.safetensors"], "does not exist"),
        (["scales=init", "data=imagefolder", "data.root=/nonexistent/data"], "/nonexistent/data"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, capsys, overrides, needle):
    run_dir = tmp_path / "bad"
    run_hydra(target_main, TINY + overrides + [f"hydra.run.dir={run_dir}"], expect_exit=1)
    assert needle in capsys.readouterr().err
    assert not (run_dir / "last.pt").exists()
    assert read_json(run_dir / "metrics.json")["status"] == "failed"


def test_resume_with_other_class_count_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_hydra(target_main, TINY + ["epochs=1", "scales=init", "deploy=false", f"hydra.run.dir={run_dir}"])
    before = (run_dir / "last.pt").read_bytes()
    run_hydra(
        target_main,
        TINY + ["epochs=2", "scales=init", "resume=true", "data.synthetic_num_classes=5", f"hydra.run.dir={run_dir}"],
        expect_exit=1,
    )
    assert "num_classes" in capsys.readouterr().err
    assert (run_dir / "last.pt").read_bytes() == before
