"""The EMA of the weights (``ema.*``): the average itself and what a run delivers (best.pt and
deploy.pt hold the EMA's weights when it is chosen). Exact resume: test_ema_resume.py."""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F

from repopt import get_arch
from repopt.config import EMAConfig, to_plain
from repopt.engine import load_checkpoint
from repopt.engine.ema import WeightEMA
from repopt.rundir import changed_settings
from repopt.vgg import RepOptVGG
from target_train.app import main as target_main
from target_train.config import TargetConfig
from target_train.deploy import load_deployed
from tests.helpers.runs import TINY, TINY_STEPS, read_json, run_hydra

ARCH = get_arch("tiny", [1, 2, 2, 2, 1])


def _inner(ema_state: dict) -> dict:
    """The averaged module's state dict out of an ``AveragedModel`` state dict (keys ``module.*``)."""
    return {k.removeprefix("module."): v for k, v in ema_state.items() if k.startswith("module.")}


def test_ema_equals_the_hand_computed_average_with_every_and_bn_buffers():
    """ema <- w at the first update, then ema <- d * ema + (1 - d) * w at every ``every``-th step,
    for every parameter and every BN buffer (running mean/var; the integer counter truncated)."""
    torch.manual_seed(0)
    model = RepOptVGG(ARCH, 10, mode="target").double().train()
    decay, every, steps = 0.7, 3, 10
    ema = WeightEMA(model, decay, every)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    expected: dict[str, torch.Tensor] = {}
    updated = []
    for t in range(1, steps + 1):
        x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
        y = torch.randint(0, 10, (8,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        updated.append(ema.step(t))
        if t % every == 0:
            for name, value in model.state_dict().items():
                if name not in expected:
                    expected[name] = value.clone()
                elif value.is_floating_point():
                    expected[name] = decay * expected[name] + (1 - decay) * value
                else:
                    expected[name] = (decay * expected[name] + (1 - decay) * value).to(value.dtype)
    assert updated == [t % every == 0 for t in range(1, steps + 1)] and ema.updates == steps // every
    got = ema.module.state_dict()
    assert got.keys() == expected.keys()
    bn = [k for k in got if "running_mean" in k or "running_var" in k]
    assert len(bn) == 2 * len(ARCH.blocks)
    for name in got:
        assert torch.allclose(got[name], expected[name], rtol=0, atol=1e-12), name
    # not vacuous: the average is neither the last weights nor the weights of the first update
    last = model.state_dict()
    assert any(not torch.allclose(got[k], last[k], atol=1e-6) for k in bn)
    assert any(not torch.allclose(got[k], last[k], atol=1e-6) for k in got if k.endswith("conv.weight"))


def test_ema_averages_the_module_inside_a_wrapper():
    """A compiled (or DDP) model is averaged through the raw module it wraps (``repopt.vgg.unwrap``)."""
    model = RepOptVGG(ARCH, 10, mode="target")
    compiled = torch.compile(model)  # nothing is compiled until it is called
    ema = WeightEMA(compiled, 0.5)
    assert ema.source is model and type(ema.module) is RepOptVGG
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.step(1)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), model.parameters()))
    assert EMAConfig().enabled is False and WeightEMA.build(EMAConfig(), model) is None


def test_settings_a_checkpoint_predates_count_as_their_defaults():
    """A checkpoint written before ``ema``/``mix`` existed resumes with their defaults, not with others."""
    defaults = to_plain(TargetConfig())
    current = to_plain(TargetConfig())
    saved = {k: v for k, v in current.items() if k not in ("ema", "mix")}
    assert changed_settings(saved, current, defaults, TargetConfig.SETTINGS_ALLOWED) == []
    current["ema"]["enabled"] = True
    assert changed_settings(saved, current, defaults, TargetConfig.SETTINGS_ALLOWED) == ["ema.enabled: False -> True"]


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_deploy_and_best_hold_the_ema_when_it_is_chosen(tmp_path):
    run_dir = tmp_path / "run"
    run_hydra(target_main, TINY + ["epochs=1", "scales=init", "ema.enabled=true", "ema.decay=0.5", f"hydra.run.dir={run_dir}"])
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "completed" and metrics["delivered"] == "ema" and metrics["deploy_max_rel_diff"] <= 1e-4
    last = load_checkpoint(run_dir / "last.pt")
    ema_model, raw_model = RepOptVGG(ARCH, 10, mode="target"), RepOptVGG(ARCH, 10, mode="target")
    ema_model.load_state_dict(_inner(last["ema"]))
    raw_model.load_state_dict(last["model"])
    ema_model.eval(), raw_model.eval()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    deployed, ema_out, raw_out = _logits(load_deployed(run_dir / "deploy.pt"), x), _logits(ema_model, x), _logits(raw_model, x)
    scale = float(ema_out.abs().max())
    assert float((deployed - ema_out).abs().max()) / scale <= 1e-4
    assert float((deployed - raw_out).abs().max()) / scale > 1e-2  # the raw model computes something else
    best = load_checkpoint(run_dir / "best.pt")  # one epoch: the best is the last
    assert best["model_source"] == "ema"
    assert all(torch.equal(best["model"][k], v) for k, v in _inner(last["ema"]).items())


def test_with_ema_evaluate_false_the_trained_model_is_delivered(tmp_path):
    run_dir = tmp_path / "run"
    run_hydra(
        target_main,
        TINY + ["epochs=1", "scales=init", "deploy=false", "ema.enabled=true", "ema.evaluate=false", f"hydra.run.dir={run_dir}"],
    )
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["delivered"] == "model" and metrics["ema_top1"] is None
    assert "ema_test_top1" not in pd.read_csv(run_dir / "history.csv").columns
    last, best = load_checkpoint(run_dir / "last.pt"), load_checkpoint(run_dir / "best.pt")
    assert "ema" in last and int(last["ema"]["n_averaged"]) == TINY_STEPS  # kept (and resumable), not evaluated
    assert "model_source" not in best and all(torch.equal(best["model"][k], v) for k, v in last["model"].items())
