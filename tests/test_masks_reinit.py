"""Gradient masks and re-initialization against independent element-wise references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import target_train
from repopt.errors import ConfigError, ScalesError
from repopt.vgg import RepOptVGG
from repopt.vgg.arch import get_arch
from target_train import build_target_model, grad_masks, masks_by_param, reinitialize

ARCHS = [("tiny", None), ("tiny", (1, 1, 2, 2, 2)), ("small", (1, 1, 1, 2, 2))]


pytestmark = pytest.mark.usefixtures("single_thread")


def signed_scales(arch, seed) -> dict[str, torch.Tensor]:
    """Random signed scales (about a third negative) for every key of ``arch``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 1.3 for k, shape in arch.scale_shapes().items()}


def reference_mask(spec, scales, rule) -> torch.Tensor:
    """Element by element, in Python floats (float64): the formula of docs/design.md, "The math", no tensor ops."""
    s_conv = scales[f"{spec.name}.scale_conv.weight"].tolist()
    s_1x1 = scales[f"{spec.name}.scale_1x1.weight"].tolist()
    f = (lambda v: v * v) if rule == "sgd" else abs
    out = []
    for o in range(spec.out_channels):
        rows = []
        for i in range(spec.in_channels):
            kernel = []
            for kh in range(3):
                line = []
                for kw in range(3):
                    v = f(s_conv[o])
                    if kh == 1 and kw == 1:
                        v = v + f(s_1x1[o])
                        if spec.has_identity and o == i:
                            v = v + 1.0
                    line.append(v)
                kernel.append(line)
            rows.append(kernel)
        out.append(rows)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------- grad masks


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, strides", ARCHS)
def test_grad_masks_match_reference(rule, dtype, name, strides):
    arch = get_arch(name, strides=strides)
    model = build_target_model(arch, 10).to(dtype)
    scales = signed_scales(arch, seed=11)
    assert any((v < 0).any() for v in scales.values())
    masks = grad_masks(model, scales, rule=rule)
    params = dict(model.named_parameters())
    # keyed by parameter name, only the 3x3 conv weights
    assert set(masks) == {f"{b.name}.conv.weight" for b in arch.blocks}
    assert all(n in params for n in masks)
    assert not any(n.startswith("linear") or ".bn." in n for n in masks)
    for spec in arch.blocks:
        name_ = f"{spec.name}.conv.weight"
        m = masks[name_]
        assert m.shape == params[name_].shape and m.dtype == dtype
        expected = reference_mask(spec, scales, rule).to(dtype)
        assert torch.equal(m, expected), name_


def test_identity_diagonal_only_for_identity_blocks():
    arch = get_arch("small", strides=(1, 1, 2, 2, 2))
    model = build_target_model(arch, 10).double()
    zeros = {k: torch.zeros(shape) for k, shape in arch.scale_shapes().items()}
    n_identity = 0
    for rule in ("sgd", "adamw"):
        masks = grad_masks(model, zeros, rule=rule)
        for spec in arch.blocks:
            m = masks[f"{spec.name}.conv.weight"]
            if spec.has_identity:
                n_identity += 1
                eye = torch.zeros_like(m)
                idx = torch.arange(spec.out_channels)
                eye[idx, idx, 1, 1] = 1.0
                assert torch.equal(m, eye), spec.name
            else:
                assert torch.count_nonzero(m) == 0, spec.name
    assert n_identity == 2 * sum(b.has_identity for b in arch.blocks) > 0


def test_adamw_rule_uses_absolute_values_per_branch():
    arch = get_arch("tiny", strides=(1, 1, 2, 2, 2))  # stage1.0 has an identity
    model = build_target_model(arch, 10).double()
    scales = {k: torch.full(shape, 0.5) for k, shape in arch.scale_shapes().items()}
    scales["stage1.0.scale_conv.weight"] = torch.full((8,), -2.0)
    scales["stage1.0.scale_1x1.weight"] = torch.full((8,), -3.0)
    adam = grad_masks(model, scales, rule="adamw")["stage1.0.conv.weight"]
    sgd = grad_masks(model, scales, rule="sgd")["stage1.0.conv.weight"]
    # |a| + |b| + 1 = 6, not |a + b + 1| = 4
    assert adam[3, 3, 1, 1].item() == 6.0
    assert adam[3, 4, 1, 1].item() == 5.0  # off-diagonal centre: |a| + |b|
    assert adam[3, 4, 0, 2].item() == 2.0  # corner: |a|
    assert (adam > 0).all()
    # s^2 rule: 4 + 9 + 1
    assert sgd[3, 3, 1, 1].item() == 14.0
    assert sgd[3, 4, 1, 1].item() == 13.0
    assert sgd[3, 4, 2, 0].item() == 4.0


def test_grad_masks_errors():
    arch = get_arch("tiny")
    model = build_target_model(arch, 10)
    scales = signed_scales(arch, 0)
    with pytest.raises(ConfigError):
        grad_masks(model, scales, rule="lamb")
    bad = dict(scales)
    bad.pop("stage0.scale_conv.weight")
    with pytest.raises(ScalesError, match="stage0.scale_conv.weight"):
        grad_masks(model, bad)
    with pytest.raises(ScalesError):
        grad_masks(model, signed_scales(get_arch("small"), 0))


def test_masks_by_param():
    arch = get_arch("tiny")
    model = build_target_model(arch, 10)
    masks = grad_masks(model, signed_scales(arch, 1))
    by_param = masks_by_param(model, masks)
    params = dict(model.named_parameters())
    assert len(by_param) == len(masks)
    for n, m in masks.items():
        assert by_param[params[n]] is m
    with pytest.raises(ConfigError, match="stage9"):
        masks_by_param(model, {"stage9.conv.weight": torch.ones(1)})


# ---------------------------------------------------------------- re-initialization


def _eye(spec, dtype):
    eye = torch.zeros(spec.out_channels, spec.in_channels, 3, 3, dtype=dtype)
    idx = torch.arange(spec.out_channels)
    eye[idx, idx, 1, 1] = 1.0
    return eye


@pytest.mark.parametrize("use_identity_scales", [True, False])
@pytest.mark.parametrize("name, strides", ARCHS)
def test_reinit_zero_branches_leaves_identity(name, strides, use_identity_scales):
    arch = get_arch(name, strides=strides)
    torch.manual_seed(0)
    model = build_target_model(arch, 10).double()
    scales = signed_scales(arch, 3)
    for k in scales:
        if not k.endswith("scale_identity.weight"):
            scales[k] = torch.zeros_like(scales[k])
    out = reinitialize(model, scales, use_identity_scales=use_identity_scales)
    assert out is model
    params = dict(model.named_parameters())
    for spec in arch.blocks:
        w = params[f"{spec.name}.conv.weight"].detach()
        if spec.has_identity:
            s_id = scales[f"{spec.name}.scale_identity.weight"].double()
            diag = s_id if use_identity_scales else torch.ones_like(s_id)
            expected = _eye(spec, torch.float64) * diag.view(-1, 1, 1, 1)
            assert torch.equal(w, expected), spec.name
        else:
            assert torch.count_nonzero(w) == 0, spec.name


def _replay_reinit(model, scales, rng_state, w3, use_identity_scales=True):
    """The expected weights: the same RNG calls reinitialize makes, then the formula of docs/design.md, "The math"."""
    torch.set_rng_state(rng_state)
    expected = {}
    for spec in model.arch.blocks:
        dtype = w3[spec.name].dtype
        w1 = nn.Conv2d(spec.in_channels, spec.out_channels, 1, bias=False, dtype=dtype).weight.detach()
        s_conv = scales[f"{spec.name}.scale_conv.weight"].to(dtype).view(-1, 1, 1, 1)
        s_1x1 = scales[f"{spec.name}.scale_1x1.weight"].to(dtype).view(-1, 1, 1, 1)
        w = s_conv * w3[spec.name] + s_1x1 * torch.nn.functional.pad(w1, [1, 1, 1, 1])
        if spec.has_identity:
            s_id = scales[f"{spec.name}.scale_identity.weight"].to(dtype).view(-1, 1, 1, 1)
            w = w + (s_id if use_identity_scales else 1.0) * _eye(spec, dtype)
        expected[spec.name] = (w, w1)
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, strides", ARCHS)
def test_reinit_general_scales_matches_formula(name, strides, dtype):
    arch = get_arch(name, strides=strides)
    torch.manual_seed(1234)
    model = build_target_model(arch, 10).to(dtype)
    scales = signed_scales(arch, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w3 = {spec.name: before[f"{spec.name}.conv.weight"] for spec in arch.blocks}
    state = torch.get_rng_state()
    reinitialize(model, scales)
    after = model.state_dict()
    expected = _replay_reinit(model, scales, state, w3)
    for spec in arch.blocks:
        w = after[f"{spec.name}.conv.weight"]
        exp_w, w1 = expected[spec.name]
        assert torch.equal(w, exp_w), spec.name
        # the fresh 1x1 init is the default (kaiming-uniform, a=sqrt(5)): |w| <= 1/sqrt(fan_in)
        assert w1.abs().max().item() <= 1.0 / math.sqrt(spec.in_channels)
    # nothing but the conv weights changed
    for k, v in before.items():
        if not k.endswith("conv.weight"):
            assert torch.equal(after[k], v), k
        else:
            assert not torch.equal(after[k], v), k


def test_reinit_decomposition_without_rng_replay():
    """Independent of RNG details: W - s_conv*W3 - s_id*I lives only at the kernel centre, and the
    centre divided by s_1x1 is a default 1x1 init (|w| <= 1/sqrt(fan_in), not all equal)."""
    arch = get_arch("small", strides=(1, 1, 2, 2, 2))
    torch.manual_seed(7)
    model = build_target_model(arch, 10).double()
    scales = signed_scales(arch, 9)
    w3 = {spec.name: model.get_parameter(f"{spec.name}.conv.weight").detach().clone() for spec in arch.blocks}
    reinitialize(model, scales)
    for spec in arch.blocks:
        w = model.get_parameter(f"{spec.name}.conv.weight").detach()
        rest = w - scales[f"{spec.name}.scale_conv.weight"].double().view(-1, 1, 1, 1) * w3[spec.name]
        if spec.has_identity:
            rest = rest - scales[f"{spec.name}.scale_identity.weight"].double().view(-1, 1, 1, 1) * _eye(spec, torch.float64)
        border = rest.clone()
        border[:, :, 1, 1] = 0
        assert border.abs().max().item() < 1e-12, spec.name
        w1 = rest[:, :, 1, 1] / scales[f"{spec.name}.scale_1x1.weight"].double().view(-1, 1)
        bound = 1.0 / math.sqrt(spec.in_channels)
        assert w1.abs().max().item() <= bound * (1 + 1e-9), spec.name
        assert w1.abs().max().item() > 0.5 * bound  # a spread-out uniform draw, not a constant
        assert w1.std().item() > 0.3 * bound / math.sqrt(3)
        # a fresh draw, not the 3x3 kernel's own centre
        assert not torch.allclose(w1, w3[spec.name][:, :, 1, 1])


def test_reinit_equals_fused_csla_block():
    """The re-initialized target equals the fused kernel of a CSLA model holding the same W3, W1, scales."""
    arch = get_arch("tiny", strides=(1, 1, 2, 2, 2))
    torch.manual_seed(21)
    target = build_target_model(arch, 10).double()
    scales = signed_scales(arch, 4)
    w3 = {spec.name: target.get_parameter(f"{spec.name}.conv.weight").detach().clone() for spec in arch.blocks}
    state = torch.get_rng_state()
    reinitialize(target, scales)
    replay = _replay_reinit(target, scales, state, w3)
    hs = RepOptVGG(arch, 10, mode="csla").double()
    with torch.no_grad():
        for spec, block in hs.blocks():
            block.conv.weight.copy_(w3[spec.name])
            block.conv_1x1.weight.copy_(replay[spec.name][1])
            block.scale_conv.weight.copy_(scales[f"{spec.name}.scale_conv.weight"])
            block.scale_1x1.weight.copy_(scales[f"{spec.name}.scale_1x1.weight"])
            if spec.has_identity:
                block.scale_identity.weight.copy_(scales[f"{spec.name}.scale_identity.weight"])
        for spec, block in hs.blocks():
            torch.testing.assert_close(
                target.get_parameter(f"{spec.name}.conv.weight").detach(), block.fused_kernel(), rtol=1e-14, atol=1e-14
            )


def test_reinit_rejects_wrong_scales_and_models():
    arch = get_arch("tiny")
    model = build_target_model(arch, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = signed_scales(arch, 0)
    bad["stage2.0.scale_1x1.weight"] = torch.ones(5)
    with pytest.raises(ScalesError, match="stage2.0.scale_1x1.weight"):
        reinitialize(model, bad)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(TypeError):
        reinitialize(RepOptVGG(arch, 10, mode="repvgg"), signed_scales(arch, 0))


def test_public_api_exports():
    for name in ("grad_masks", "masks_by_param", "reinitialize", "build_target_model", "build_repopt", "fuse"):
        assert callable(getattr(target_train, name))
