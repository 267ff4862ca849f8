"""RepOpt-GhostNet: the official layout and scales, the handler's formulas, CSLA == target, folding."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from repopt.errors import ConfigError, ScalesError
from repopt.family import build_model, family_of, get_spec
from repopt.ghostnet.blocks import GhostModule, depthwise_identity
from repopt.numerics import rel_diff
from repopt.scales import load_scales, random_scales, read_scales
from target_train.equivalence import DEFAULT_EPS, GHOSTNET_BOUNDS, run_equivalence
from target_train.families.ghostnet import module_mask
from target_train.handler import fuse, grad_masks, reinitialize
from target_train.optim import RepOptAdamW, RepOptSGD, param_groups
from target_train.verify import main as verify_main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def official():
    return load_scales("official:ghostnet_0_5x", "ghostnet_0_5x")


def test_the_released_scales_load_strictly_with_the_official_key_layout(official):
    spec = get_spec("ghostnet_0_5x")
    assert family_of(spec).name == "ghostnet" and len(official) == 64
    hs = build_model(spec, 100, "hs")
    assert set(hs.scale_parameters()) == set(official) == set(spec.scale_shapes())
    for key, value in official.items():
        assert tuple(value.shape) == spec.scale_shapes()[key] and value.dtype == torch.float32
    assert read_scales("official", spec).sha256 == read_scales("official:ghostnet_0_5x", spec).sha256


def test_hs_init_is_the_official_per_module_index_rule(official):
    """sqrt(2/(m+1)) per module index m, the count restarting where the shape changes: the last stage's
    cheap-operation scales barely moved in the released search, so they still show the init."""
    init = get_spec("ghostnet_0_5x").init_scales()
    for i, (m1, m2) in enumerate([(3, 4), (5, 6), (7, 8), (9, 10)]):
        for ghost, m in (("ghost1", m1), ("ghost2", m2)):
            key = f"blocks.8.{i}.{ghost}.cheap_operation.1.weight"
            assert init[key][0].item() == pytest.approx(math.sqrt(2 / (m + 1)))
            assert float(official[key].mean()) == pytest.approx(init[key][0].item(), abs=2e-3)
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in init.items() if "fusion_scale" in k)
    assert init["blocks.0.0.ghost1.cheap_operation.1.weight"][0].item() == pytest.approx(1.0)  # m = 1: sqrt(2/2)


def test_the_0_5x_widths_and_parameter_count_match_repghostnet(official):
    model = build_model("ghostnet_0_5x", 1000, "rep")
    n = sum(p.numel() for p in model.parameters())
    assert 2.2e6 < n < 2.4e6  # RepGhostNet 0.5x: 2.3 M parameters
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)


def test_masks_equal_the_official_formulas_on_the_released_scales(official):
    """M = s^power everywhere + the depthwise identity kernel (the official handler) wherever s > 0;
    the released file has a few negative cheap-operation scales, where AdamW's mask is |s| (+ 1),
    not the official s (which would be a negative step size), and SGD's s^2 is the official one."""
    target = build_model("ghostnet_0_5x", 100, "target")
    negative = 0
    for rule, power in (("sgd", 2), ("adamw", 1)):
        masks = grad_masks(target, official, rule)
        assert len(masks) == 32
        for path, module in target.ghost_modules():
            w = module.dw.weight
            s = official[f"{path}.cheap_operation.1.weight"].view(-1, 1, 1, 1)
            eye = depthwise_identity(w.shape[0], w.shape[-1])
            official_mask = torch.ones_like(w) * s**power + eye
            mask = masks[f"{path}.cheap_operation.0.weight"]
            positive = (s > 0).view(-1)
            torch.testing.assert_close(mask[positive], official_mask[positive], rtol=1e-6, atol=0)
            torch.testing.assert_close(mask, torch.ones_like(w) * s.abs() ** power + eye, rtol=1e-6, atol=0)
            negative += int((~positive).sum())
    assert negative > 0  # the released scales do exercise the signed case


def test_masks_of_negative_scales_use_the_magnitude_for_adamw():
    s = torch.tensor([-2.0, 0.5, -0.25])
    centre = (slice(None), 0, 1, 1)
    adamw, sgd = module_mask(s, 3, "adamw"), module_mask(s, 3, "sgd")
    assert torch.equal(adamw[:, 0, 0, 0], s.abs()) and torch.equal(adamw[centre], s.abs() + 1)
    assert torch.equal(sgd[:, 0, 0, 0], s.square()) and torch.equal(sgd[centre], s.square() + 1)
    with pytest.raises(ConfigError, match="grad-mask rule"):
        module_mask(s, 3, "lion")


def test_wrong_family_or_width_scales_are_clear_errors():
    with pytest.raises(ScalesError, match="holds vgg scales, but arch ghostnet_0_5x is a ghostnet"):
        read_scales("official:B1", "ghostnet_0_5x")
    with pytest.raises(ScalesError, match="holds ghostnet scales, but arch B1 is a vgg"):
        read_scales("official:ghostnet_0_5x", "B1")
    with pytest.raises(ScalesError, match=r"shape \(4,\), arch ghostnet_1_0x needs \(8,\)"):
        read_scales("official:ghostnet_0_5x", "ghostnet_1_0x")
    with pytest.raises(ScalesError, match="no official scales for 'ghostnet_tiny'"):
        read_scales("official", "ghostnet_tiny")
    with pytest.raises(ConfigError, match="apply to the vgg family only"):
        get_spec("ghostnet_tiny", num_blocks=[1, 1, 1, 1])


@torch.no_grad()
def test_reinitialize_is_the_fused_csla_module_at_step_0():
    spec = get_spec("ghostnet_tiny")
    scales = random_scales(spec, 3)
    torch.manual_seed(0)
    target = build_model(spec, 10, "target")
    before = {path: m.dw.weight.clone() for path, m in target.ghost_modules()}
    reinitialize(target, scales)
    for path, module in target.ghost_modules():
        w0, s, f = before[path], scales[f"{path}.cheap_operation.1.weight"], scales[f"{path}.fusion_scale.weight"]
        expected = w0 * s.view(-1, 1, 1, 1)
        expected[:, 0, w0.shape[-1] // 2, w0.shape[-1] // 2] += f
        torch.testing.assert_close(module.dw.weight, expected, rtol=0, atol=1e-7)
    plain = build_model(spec, 10, "target")
    w0 = {path: m.dw.weight.clone() for path, m in plain.ghost_modules()}
    reinitialize(plain, scales, use_identity_scales=False)
    path, module = plain.ghost_modules()[0]
    k = w0[path].shape[-1] // 2
    torch.testing.assert_close(
        module.dw.weight[:, 0, k, k], w0[path][:, 0, k, k] * scales[f"{path}.cheap_operation.1.weight"] + 1.0
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_single_ghost_module_csla_equals_target(optimizer):
    """One ghost module: 3x3 depthwise * s_cheap + x1 * s_fusion with plain torch optimizers equals the
    target module (depthwise conv only) with the RepOptimizer, float64, signed scales."""
    torch.manual_seed(0)
    csla = GhostModule(6, 8, 3, True, "csla").double()
    with torch.no_grad():
        csla.cheap_operation[1].weight.copy_(torch.tensor([1.3, -0.7, 0.4, -1.1, 0.9, -0.3, 1.5, -0.6]))
        csla.fusion_scale.weight.copy_(torch.tensor([0.8, -1.2, 1.0, 0.5, -0.9, 1.4, -0.2, 0.7]))
    target = GhostModule(6, 8, 3, True, "target").double()
    state = {k: v for k, v in csla.state_dict().items() if k in target.state_dict()}
    state["cheap_operation.0.weight"] = csla.fused_kernel().detach()
    target.load_state_dict(state)
    s_cheap = csla.cheap_operation[1].weight.detach()
    mask = {target.dw.weight: module_mask(s_cheap, 3, optimizer).double()}
    eps = 1e-16
    if optimizer == "sgd":
        opt_c = torch.optim.SGD(param_groups(csla, 1e-3), lr=0.05, momentum=0.9, nesterov=True)
        opt_t = RepOptSGD(param_groups(target, 1e-3), mask, lr=0.05, momentum=0.9, nesterov=True)
    else:
        opt_c = torch.optim.AdamW(param_groups(csla, 1e-3), lr=1e-2, eps=eps)
        opt_t = RepOptAdamW(param_groups(target, 1e-3), mask, lr=1e-2, eps=eps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randn(4, 6, 8, 8, generator=gen, dtype=torch.float64)
        for model, opt in ((csla, opt_c), (target, opt_t)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert rel_diff(csla.fused_kernel(), target.dw.weight) <= 1e-10
    x = torch.randn(4, 6, 8, 8, generator=gen, dtype=torch.float64)
    assert rel_diff(target.eval()(x), csla.eval()(x)) <= 1e-10


def test_whole_model_sgd_momentum_nesterov_weight_decay_is_exact():
    r = run_equivalence("ghostnet_tiny", "sgd", 20, torch.float64, momentum=0.9, nesterov=True, weight_decay=1e-3)
    bound = GHOSTNET_BOUNDS[("sgd", torch.float64)]
    assert max(r.weight_rel_diff, r.logit_rel_diff, r.bn_rel_diff) <= bound == 1e-10, r


def test_whole_model_adamw_agrees_up_to_eps():
    """The remaining AdamW difference is eps's: ten times eps, ten times the kernel difference."""
    eps = DEFAULT_EPS["ghostnet"]
    r = run_equivalence("ghostnet_tiny", "adamw", 20, torch.float64, eps=eps)
    assert r.weight_rel_diff <= 1e-9 and r.passed(GHOSTNET_BOUNDS[("adamw", torch.float64)]), r
    wider = run_equivalence("ghostnet_tiny", "adamw", 20, torch.float64, eps=eps * 10).weight_rel_diff
    assert 5 <= wider / r.weight_rel_diff <= 20


def test_verify_cli_passes_for_the_family(capsys):
    assert verify_main(["--family", "ghostnet", "--steps", "3", "--dtypes", "float64"]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok") == 2 and "FAIL" not in out


def test_fused_forward_computes_the_branch_sum():
    spec = replace(get_spec("ghostnet_tiny"), dropout=0.0)  # the same function in train mode, no random draw
    torch.manual_seed(0)
    a = build_model(spec, 10, "hs").double()
    torch.manual_seed(0)
    b = build_model(spec, 10, "hs", fused_forward=True).double()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p_a, p_b in zip(a.scale_parameters().values(), b.scale_parameters().values()):
            p_a.uniform_(-1.5, 1.5)
            p_b.copy_(p_a)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    assert rel_diff(b(x), a(x)) <= 1e-12


@pytest.mark.parametrize("mode", ["target", "rep", "hs", "csla"])
def test_fold_into_the_deployed_model(mode):
    """Every mode folds into conv(+bias) layers with no BN left, computing the same eval-mode function."""
    torch.manual_seed(0)
    model = build_model(get_spec("ghostnet_tiny", strides=(1, 2, 2, 2, 1)), 10, mode)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        if mode in ("hs", "csla"):
            for p in model.scale_parameters().values():
                p.uniform_(-1.5, 1.5)
    model.eval()
    deployed = fuse(model)
    assert deployed.mode == "deploy" and not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert rel_diff(deployed(x), model(x)) <= 1e-5
