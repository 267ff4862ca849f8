"""RepOptimizers: weight-decay groups, equality with torch's SGD/AdamW, masked references,
checkpoints, AMP, argument checks and the one-call builder."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from repopt.errors import ConfigError
from repopt.scales import random_scales
from repopt.vgg import RepOptVGG
from repopt.vgg.arch import get_arch
from target_train import (
    RepOptAdamW,
    RepOptSGD,
    build_optimizer,
    build_repopt,
    build_target_model,
    grad_masks,
    masks_by_param,
    param_groups,
    reinitialize,
)

ARCH = get_arch("tiny", strides=(1, 1, 2, 2, 2))  # identity blocks, stride-2 blocks, stage0 without identity


pytestmark = pytest.mark.usefixtures("single_thread")


def signed_scales(arch=ARCH, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 1.3 for k, shape in arch.scale_shapes().items()}


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return build_target_model(ARCH, 10).to(dtype)


def feed_grads(models, step, seed=0, scale=1.0):
    """The same deterministic pseudo-gradients on every model (by parameter order)."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) * scale for p in models[0].parameters()]
    for m in models:
        for p, gr in zip(m.parameters(), grads):
            p.grad = gr.to(p.dtype).clone()


def assert_params_equal(a, b, exact=True, rtol=0.0, atol=0.0):
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        if exact:
            assert torch.equal(pa, pb), na
        else:
            torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=na)


def ones_masks(model):
    return masks_by_param(model, {n: torch.ones_like(p) for n, p in model.named_parameters() if n.endswith("conv.weight")})


def sgd_masks(model, seed=0):
    return masks_by_param(model, grad_masks(model, signed_scales(seed=seed), rule="sgd"))


def adamw_masks(model, seed=0):
    return masks_by_param(model, grad_masks(model, signed_scales(seed=seed), rule="adamw"))


def _names(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


# ---------------------------------------------------------------- weight-decay groups


def test_param_groups_hs_model():
    model = RepOptVGG(ARCH, 10, mode="hs")
    groups = param_groups(model, weight_decay=5e-4)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    decay, no_decay = _names(model, groups[0]["params"]), _names(model, groups[1]["params"])
    all_names = {n for n, _ in model.named_parameters()}
    assert decay | no_decay == all_names and not decay & no_decay
    expected_decay = {
        n
        for n in all_names
        if n.endswith(("conv.weight", "conv_1x1.weight", "scale_identity.weight")) and ".scale_conv." not in n
    } | {"linear.weight"}
    assert decay == expected_decay
    assert "stage1.0.scale_identity.weight" in decay and "stage1.0.conv_1x1.weight" in decay
    for n in no_decay:
        assert n.endswith(("bn.weight", "bn.bias", "scale_conv.weight", "scale_1x1.weight", "linear.bias")), n
    assert "stage1.0.scale_conv.weight" in no_decay and "stage1.0.scale_1x1.weight" in no_decay
    assert "stage0.bn.weight" in no_decay and "linear.bias" in no_decay


def test_param_groups_csla_model_skips_frozen_scales():
    model = RepOptVGG(ARCH, 10, mode="csla")
    groups = param_groups(model, weight_decay=1e-4)
    names = set().union(*(_names(model, g["params"]) for g in groups))
    assert not any("scale_conv" in n or "scale_1x1" in n for n in names)
    assert "stage2.1.scale_identity.weight" in _names(model, groups[0]["params"])


def test_param_groups_target_model():
    model = make_model(torch.float32)
    decay_g, no_decay_g = param_groups(model, weight_decay=1e-3)
    decay, no_decay = _names(model, decay_g["params"]), _names(model, no_decay_g["params"])
    assert decay == {f"{b.name}.conv.weight" for b in ARCH.blocks} | {"linear.weight"}
    assert no_decay == (
        {f"{b.name}.bn.weight" for b in ARCH.blocks} | {f"{b.name}.bn.bias" for b in ARCH.blocks} | {"linear.bias"}
    )
    assert decay_g["weight_decay"] == 1e-3 and no_decay_g["weight_decay"] == 0.0


# ---------------------------------------------------------------- RepOptSGD


SGD_CONFIGS = [
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, nesterov=False),
    dict(momentum=0.8, nesterov=False, dampening=0.1),
    dict(momentum=0.0, nesterov=False),
    dict(momentum=0.9, nesterov=True, maximize=True),
]


@pytest.mark.parametrize("impl", [dict(foreach=True), dict(foreach=False), dict(fused=True)])
@pytest.mark.parametrize("cfg", SGD_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_repopt_sgd_with_ones_equals_sgd(impl, cfg, dtype):
    a = make_model(dtype)
    b = copy.deepcopy(a)
    opt_a = RepOptSGD(param_groups(a, 1e-2), ones_masks(a), lr=0.05, **cfg, **impl)
    opt_b = torch.optim.SGD(param_groups(b, 1e-2), lr=0.05, **cfg, **impl)
    start = copy.deepcopy(a)
    for step in range(4):
        feed_grads([a, b], step)
        opt_a.step()
        opt_b.step()
    assert_params_equal(a, b)
    assert not torch.equal(a.stage0.conv.weight, start.stage0.conv.weight)


def reference_masked_sgd(params, masks, steps_grads, lr, momentum, wd, nesterov, dampening=0.0):
    """grad*mask, then + wd*p (unmasked), then momentum / Nesterov: the official order."""
    params = [p.detach().clone() for p in params]
    bufs = [None] * len(params)
    for grads in steps_grads:
        for i, (p, g) in enumerate(zip(params, grads)):
            d = g * masks[i] if masks[i] is not None else g.clone()
            d = d + wd[i] * p
            if momentum:
                if bufs[i] is None:
                    bufs[i] = d.clone()
                else:
                    bufs[i] = bufs[i] * momentum + (1 - dampening) * d
                d = d + momentum * bufs[i] if nesterov else bufs[i]
            p -= lr * d
    return params


@pytest.mark.parametrize("impl", [dict(foreach=True), dict(foreach=False), dict(fused=True)])
@pytest.mark.parametrize("cfg", SGD_CONFIGS[:3])
def test_repopt_sgd_masked_equals_reference(impl, cfg):
    model = make_model(torch.float64)
    masks = sgd_masks(model)
    init = [p.detach().clone() for p in model.parameters()]
    groups = param_groups(model, 3e-2)
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    opt = RepOptSGD(groups, masks, lr=0.03, **cfg, **impl)
    steps_grads = []
    for step in range(5):
        feed_grads([model], step, seed=1)
        steps_grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    params = list(model.parameters())
    expected = reference_masked_sgd(
        init,
        [masks.get(p) for p in params],
        steps_grads,
        lr=0.03,
        momentum=cfg["momentum"],
        wd=[wd_of[id(p)] for p in params],
        nesterov=cfg["nesterov"],
        dampening=cfg.get("dampening", 0.0),
    )
    for (name, p), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-13, atol=1e-15, msg=name)
    # the masks really changed the trajectory of the conv weights (and only theirs)
    plain = reference_masked_sgd(
        init,
        [None] * len(params),
        steps_grads,
        lr=0.03,
        momentum=cfg["momentum"],
        wd=[wd_of[id(p)] for p in params],
        nesterov=cfg["nesterov"],
        dampening=cfg.get("dampening", 0.0),
    )
    for (name, p), e in zip(model.named_parameters(), plain):
        if name.endswith("conv.weight"):
            assert (p.detach() - e).abs().max() > 1e-3, name
        else:
            assert torch.allclose(p.detach(), e, rtol=1e-13, atol=1e-15), name


@pytest.mark.parametrize("impl", [dict(foreach=True), dict(foreach=False), dict(fused=True)])
def test_repopt_sgd_weight_decay_is_not_masked(impl):
    """With a zero mask the gradient vanishes but the decay still acts: p <- p - lr*wd*p."""
    model = make_model(torch.float64)
    zero = masks_by_param(model, {"stage1.0.conv.weight": torch.zeros_like(model.stage1[0].conv.weight)})
    opt = RepOptSGD([model.stage1[0].conv.weight], zero, lr=0.5, momentum=0.9, weight_decay=0.1, **impl)
    before = model.stage1[0].conv.weight.detach().clone()
    feed_grads([model], 0)
    opt.step()
    torch.testing.assert_close(model.stage1[0].conv.weight.detach(), before * (1 - 0.5 * 0.1), rtol=1e-15, atol=0)


def test_repopt_sgd_closure_and_missing_grads():
    model = make_model(torch.float64)
    ref = copy.deepcopy(model)
    opt = RepOptSGD(model.parameters(), sgd_masks(model), lr=0.1, momentum=0.9)
    ref_opt = RepOptSGD(ref.parameters(), sgd_masks(ref), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    ref_opt.zero_grad()
    ref_loss = ref(x).square().mean()
    ref_loss.backward()
    ref_opt.step()
    assert torch.equal(loss, ref_loss)
    assert_params_equal(model, ref)
    # parameters without gradients are skipped without error
    opt.zero_grad(set_to_none=True)
    model.linear.weight.grad = torch.ones_like(model.linear.weight)
    before = model.stage0.conv.weight.detach().clone()
    opt.step()
    assert torch.equal(model.stage0.conv.weight, before)


# ---------------------------------------------------------------- RepOptAdamW


@pytest.mark.parametrize("wd, maximize", [(0.0, False), (0.05, False), (0.05, True)])
def test_repopt_adamw_with_ones_equals_adamw(wd, maximize):
    a = make_model(torch.float64)
    b = copy.deepcopy(a)
    opt_a = RepOptAdamW(param_groups(a, wd), ones_masks(a), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, maximize=maximize)
    opt_b = torch.optim.AdamW(param_groups(b, wd), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, maximize=maximize)
    start = copy.deepcopy(a)
    for step in range(10):
        feed_grads([a, b], step, seed=2)
        opt_a.step()
        opt_b.step()
    assert_params_equal(a, b, exact=False, rtol=1e-12, atol=1e-14)
    for pa, pb in zip(a.parameters(), b.parameters()):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert float(sa["step"]) == float(sb["step"]) == 10.0
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-13, atol=0)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-13, atol=0)
    # Adam moves every weight by about lr per step: the comparison is not trivially small
    assert (a.stage0.conv.weight - start.stage0.conv.weight).abs().max() > 5e-2


def reference_masked_adamw(params, masks, steps_grads, lr, betas, eps, wd):
    b1, b2 = betas
    params = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(steps_grads, start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            p *= 1 - lr * wd[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            u = m_hat / (v_hat.sqrt() + eps)
            if masks[i] is not None:
                u = u * masks[i]
            p -= lr * u
    return params


def test_repopt_adamw_masked_equals_reference():
    model = make_model(torch.float64)
    masks = adamw_masks(model)
    init = [p.detach().clone() for p in model.parameters()]
    groups = param_groups(model, 0.05)
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    opt = RepOptAdamW(groups, masks, lr=3e-3, betas=(0.9, 0.999), eps=1e-8)
    steps_grads = []
    for step in range(10):
        feed_grads([model], step, seed=3)
        steps_grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    params = list(model.parameters())
    wd = [wd_of[id(p)] for p in params]
    expected = reference_masked_adamw(init, [masks.get(p) for p in params], steps_grads, 3e-3, (0.9, 0.999), 1e-8, wd)
    for (name, p), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14, msg=name)
    # masking the gradient instead of the update would be (almost) a no-op under Adam: not what happens
    plain = reference_masked_adamw(init, [None] * len(params), steps_grads, 3e-3, (0.9, 0.999), 1e-8, wd)
    w = model.stage2[1].conv.weight.detach()
    i = [id(p) for p in params].index(id(model.stage2[1].conv.weight))
    assert (w - plain[i]).abs().max() > 1e-3


def test_repopt_adamw_mask_scales_the_step():
    """A constant mask c multiplies the Adam step by c exactly (without decay)."""
    a = make_model(torch.float64)
    b = copy.deepcopy(a)
    w_a, w_b = a.stage3[0].conv.weight, b.stage3[0].conv.weight
    opt_a = RepOptAdamW([w_a], {w_a: torch.full_like(w_a, 2.5)}, lr=1e-2, weight_decay=0.0)
    opt_b = torch.optim.AdamW([w_b], lr=1e-2, weight_decay=0.0)
    start = w_a.detach().clone()
    for step in range(3):
        feed_grads([a, b], step)
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(w_a.detach() - start, 2.5 * (w_b.detach() - start), rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------- checkpoints


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind", ["sgd", "sgd_fused", "adamw"])
def test_state_dict_roundtrip(kind):
    def build(model):
        groups = param_groups(model, 1e-2)
        if kind == "adamw":
            return RepOptAdamW(groups, adamw_masks(model), lr=1e-2)
        return RepOptSGD(groups, sgd_masks(model), lr=0.05, momentum=0.9, nesterov=True, fused=kind == "sgd_fused")

    a = make_model(torch.float64)
    opt_a = build(a)
    for step in range(3):
        feed_grads([a], step, seed=4)
        opt_a.step()
    b = copy.deepcopy(a)
    opt_b = build(b)
    opt_b.load_state_dict(_roundtrip(opt_a.state_dict()))
    fresh = copy.deepcopy(a)
    opt_fresh = build(fresh)
    for step in range(3, 6):
        feed_grads([a, b, fresh], step, seed=4)
        opt_a.step()
        opt_b.step()
        opt_fresh.step()
    assert_params_equal(a, b)
    # the loaded state mattered: without it the trajectory differs
    assert not torch.equal(a.stage1[0].conv.weight, fresh.stage1[0].conv.weight)
    # the masks survive a load (they are not part of the state dict)
    assert all(torch.equal(opt_b.grad_masks[p], m) for p, m in (adamw_masks(b) if kind == "adamw" else sgd_masks(b)).items())


def test_adamw_state_dict_loads_into_torch_adamw():
    a = make_model(torch.float64)
    opt_a = RepOptAdamW(param_groups(a, 1e-2), ones_masks(a), lr=1e-2)
    for step in range(2):
        feed_grads([a], step)
        opt_a.step()
    b = copy.deepcopy(a)
    opt_b = torch.optim.AdamW(param_groups(b, 1e-2), lr=1e-2)
    opt_b.load_state_dict(_roundtrip(opt_a.state_dict()))
    for step in range(2, 5):
        feed_grads([a, b], step)
        opt_a.step()
        opt_b.step()
    assert_params_equal(a, b, exact=False, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- AMP


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_with_repopt_sgd(fused):
    model = make_model(torch.float32, seed=5)
    ref = copy.deepcopy(model)
    opt = RepOptSGD(param_groups(model, 1e-3), sgd_masks(model), lr=0.05, momentum=0.9, fused=fused)
    ref_opt = RepOptSGD(param_groups(ref, 1e-3), sgd_masks(ref), lr=0.05, momentum=0.9, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(1))

    # a normal step: same result as the unscaled optimizer
    scaler.scale(torch.nn.functional.cross_entropy(model(x), target)).backward()
    scaler.step(opt)
    scaler.update()
    torch.nn.functional.cross_entropy(ref(x), target).backward()
    ref_opt.step()
    assert_params_equal(model, ref, exact=False, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == 2.0**10

    # an overflowing step is skipped: parameters and momentum unchanged, the scale backs off
    opt.zero_grad()
    before = copy.deepcopy(model.state_dict())
    bufs = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters() if "momentum_buffer" in opt.state[p]}
    scaler.scale(torch.nn.functional.cross_entropy(model(x), target)).backward()
    model.stage2[0].conv.weight.grad[0, 0, 1, 1] = float("inf")
    scaler.step(opt)
    scaler.update()
    after = model.state_dict()
    for k, v in before.items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(after[k], v), k
    for p in model.parameters():
        if id(p) in bufs:
            assert torch.equal(opt.state[p]["momentum_buffer"], bufs[id(p)])
    assert scaler.get_scale() == 2.0**9


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize("cls", [RepOptSGD, RepOptAdamW])
def test_bad_masks_raise_config_error(cls):
    model = make_model(torch.float32)
    w = model.stage1[0].conv.weight
    with pytest.raises(ConfigError, match="shape"):
        cls(model.parameters(), {w: torch.ones(w.shape[0], w.shape[1], 1, 1)}, lr=0.1)
    with pytest.raises(ConfigError):
        cls(model.parameters(), {model.linear.weight: torch.ones(3)}, lr=0.1)
    other = make_model(torch.float32)
    with pytest.raises(ConfigError, match="not in the optimizer"):
        cls(model.parameters(), {other.stage1[0].conv.weight: torch.ones_like(w)}, lr=0.1)
    with pytest.raises(ConfigError, match="not in the optimizer"):
        cls([model.linear.weight], {w: torch.ones_like(w)}, lr=0.1)
    with pytest.raises(ConfigError):
        cls(model.parameters(), {"stage1.0.conv.weight": torch.ones_like(w)}, lr=0.1)


def test_masks_follow_param_dtype():
    model = make_model(torch.float64)
    w = model.stage1[0].conv.weight
    opt = RepOptSGD(model.parameters(), {w: torch.ones(w.shape, dtype=torch.float32)}, lr=0.1)
    assert opt.grad_masks[w].dtype == torch.float64


# ---------------------------------------------------------------- builders


def test_build_repopt_sgd():
    scales = signed_scales(seed=7)
    model = make_model(torch.float64, seed=3)
    twin = copy.deepcopy(model)
    state = torch.get_rng_state()
    opt = build_repopt(model, scales, lr=0.2, weight_decay=1e-4)
    torch.set_rng_state(state)
    reinitialize(twin, scales)
    assert_params_equal(model, twin)  # re-initialized exactly as reinitialize does
    assert type(opt) is RepOptSGD
    assert opt.defaults["lr"] == 0.2 and opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    expected = grad_masks(model, scales, rule="sgd")
    params = dict(model.named_parameters())
    assert len(opt.grad_masks) == len(expected)
    for name, mask in expected.items():
        assert torch.equal(opt.grad_masks[params[name]], mask), name
    # scales with negative entries: power 2 masks are positive everywhere
    assert all((m > 0).all() for m in opt.grad_masks.values())


def test_build_repopt_adamw():
    scales = signed_scales(seed=8)
    model = make_model(torch.float64)
    opt = build_repopt(model, scales, name="adamw", lr=1e-3, weight_decay=0.05)
    assert type(opt) is RepOptAdamW
    params = dict(model.named_parameters())
    expected = grad_masks(model, scales, rule="adamw")
    assert len(opt.grad_masks) == len(expected)
    for name, mask in expected.items():
        assert torch.equal(opt.grad_masks[params[name]], mask), name
    # |s| masks, not s^2: compare one entry by hand
    s_conv = scales["stage1.1.scale_conv.weight"][0].double()
    s_1x1 = scales["stage1.1.scale_1x1.weight"][0].double()
    m = opt.grad_masks[params["stage1.1.conv.weight"]]
    assert m[0, 0, 1, 1].item() == (s_conv.abs() + s_1x1.abs() + 1.0).item()
    assert m[0, 1, 0, 0].item() == s_conv.abs().item()


def test_build_optimizer_plain_and_errors():
    model = make_model(torch.float32)
    assert type(build_optimizer(model, "sgd", 0.1, 1e-4)) is torch.optim.SGD
    assert type(build_optimizer(model, "adamw", 1e-3, 0.05)) is torch.optim.AdamW
    with pytest.raises(ConfigError):
        build_optimizer(model, "lamb", 0.1, 0.0)
    with pytest.raises(ConfigError):
        build_optimizer(RepOptVGG(ARCH, 10, mode="repvgg"), "sgd", 0.1, 0.0, scales=signed_scales())


def test_param_groups_without_weight_decay_leave_it_to_the_optimizer():
    """The official set_weight_decay: the decay group has no key, so ``weight_decay=`` of the optimizer applies."""
    model = build_target_model(ARCH, 10)
    groups = param_groups(model)
    assert "weight_decay" not in groups[0] and groups[1]["weight_decay"] == 0.0
    scales = random_scales(ARCH, 3)
    masks = masks_by_param(model, grad_masks(model, scales))
    opt = RepOptSGD(param_groups(model), masks, lr=0.1, weight_decay=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    weight = model.stage0.conv.weight
    before = weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradient: only the decay moves the weight, by lr * wd * w
    torch.testing.assert_close(weight.detach(), before * (1 - 0.1 * 1e-3), rtol=1e-6, atol=0)
    assert torch.equal(model.stage0.bn.weight.detach(), torch.ones_like(model.stage0.bn.weight))  # no decay on BN


# ---------------------------------------------------------------- the default step: compiled where available


def _compiled_unavailable_reason(model):
    from target_train.optim import compiled_step_unavailable

    return compiled_step_unavailable(model.parameters())


def _optim_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "target_train.optim" and r.levelname == "WARNING"]


def _train_pair(models, opts, steps, seed=6):
    for step in range(steps):
        feed_grads(models, step, seed=seed)
        for opt in opts:
            opt.step()


def test_default_step_is_the_compiled_one_and_equals_the_eager_step(monkeypatch, caplog):
    """Auto (compiled=None, what the apps build) picks the compiled single pass where it is available
    and the model is large enough; it equals the eager masked step within the compiled step's bound."""
    import target_train.optim as optim_mod
    from repopt.config import OptimConfig

    assert OptimConfig().compile_step is None  # the config's default is auto
    a = make_model(torch.float32, seed=9)
    if (reason := _compiled_unavailable_reason(a)) is not None:
        pytest.skip(f"the compiled step is not available here: {reason}")
    monkeypatch.setattr(optim_mod, "AUTO_COMPILE_MIN_PARAMS", 0)  # the tiny model stands in for a large one
    b = copy.deepcopy(a)
    start = copy.deepcopy(a)
    scales = signed_scales(seed=9)
    caplog.set_level("INFO", logger="target_train.optim")
    default = build_optimizer(a, "sgd", 0.05, 1e-3, scales=scales)  # as target_train/app.py builds it
    eager = build_optimizer(b, "sgd", 0.05, 1e-3, scales=scales, compiled=False)
    assert type(default) is RepOptSGD and default.compiled and default.eager_reason is None
    assert not default._step_supports_amp_scaling  # GradScaler unscales and skips inf steps before step()
    assert not eager.compiled and eager.param_groups[0]["fused"] is True  # the eager step: mask pass + fused SGD
    calls = []
    kernel = optim_mod._masked_sgd_kernel()
    monkeypatch.setattr(optim_mod, "_masked_sgd_kernel", lambda: lambda *args: calls.append(1) or kernel(*args))
    _train_pair([a, b], [default, eager], steps=6)
    assert len(calls) == 6 and default.compiled  # every step ran the compiled kernel, none fell back
    assert not _optim_warnings(caplog)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert float((pa - pb).detach().abs().max() / pb.detach().abs().max().clamp_min(1e-12)) <= 1e-5, name
    assert (a.stage1[0].conv.weight - start.stage1[0].conv.weight).abs().max() > 1e-3
    for p, q in zip(a.parameters(), b.parameters()):  # torch's momentum_buffer layout either way
        u, v = default.state[p]["momentum_buffer"], eager.state[q]["momentum_buffer"]
        assert float((u - v).abs().max() / v.abs().max().clamp_min(1e-12)) <= 1e-4


def test_default_step_below_the_size_threshold_or_with_a_chosen_kernel_is_eager(caplog):
    caplog.set_level("DEBUG", logger="target_train.optim")
    model = make_model(torch.float32)
    small = RepOptSGD(param_groups(model, 1e-3), sgd_masks(model), lr=0.1, momentum=0.9)
    assert not small.compiled and "parameters, under the" in small.eager_reason
    chosen = RepOptSGD(param_groups(model, 1e-3), sgd_masks(model), lr=0.1, momentum=0.9, compiled=None, foreach=True)
    assert not chosen.compiled and chosen.eager_reason == "foreach/fused chosen"
    never = RepOptSGD(param_groups(model, 1e-3), sgd_masks(model), lr=0.1, momentum=0.9, compiled=False)
    assert not never.compiled and never.eager_reason == "compiled=False"
    assert not _optim_warnings(caplog)  # none of these is a fallback


def test_fallback_when_compilation_fails_trains_the_eager_step(monkeypatch, caplog):
    """A compilation that raises at the first step (no compiler, an inductor error) does not stop the
    run: one warning, then that step and every later one are the eager masked step, exactly."""
    import target_train.optim as optim_mod

    monkeypatch.setattr(optim_mod, "AUTO_COMPILE_MIN_PARAMS", 0)
    monkeypatch.setattr(optim_mod, "compiled_step_unavailable", lambda *a, **k: None)  # looks available
    attempts = []

    def failing_kernel():
        def kernel(*args):
            attempts.append(1)
            raise RuntimeError("backend='inductor' raised:\nInvalidCxxCompiler: No working C++ compiler found")

        return kernel

    monkeypatch.setattr(optim_mod, "_masked_sgd_kernel", failing_kernel)
    caplog.set_level("INFO", logger="target_train.optim")
    model = make_model(torch.float64)
    ref = copy.deepcopy(model)
    masks = sgd_masks(model)
    init = [p.detach().clone() for p in model.parameters()]
    groups = param_groups(model, 3e-2)
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    opt = RepOptSGD(groups, masks, lr=0.03, momentum=0.9, nesterov=True)
    eager = RepOptSGD(param_groups(ref, 3e-2), sgd_masks(ref), lr=0.03, momentum=0.9, nesterov=True, compiled=False)
    assert opt.compiled
    steps_grads = []
    for step in range(4):
        feed_grads([model, ref], step, seed=1)
        steps_grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        eager.step()
    assert len(attempts) == 1 and not opt.compiled  # tried once, then never again
    assert opt.eager_reason.startswith("compilation failed (RuntimeError: backend='inductor' raised:")
    warnings = _optim_warnings(caplog)
    assert len(warnings) == 1 and "compiling the single-pass step failed" in warnings[0], warnings
    assert_params_equal(model, ref)  # exactly the eager step, from the failed step on
    params = list(model.parameters())
    expected = reference_masked_sgd(
        init, [masks.get(p) for p in params], steps_grads, lr=0.03, momentum=0.9, wd=[wd_of[id(p)] for p in params], nesterov=True
    )
    for (name, p), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-13, atol=1e-15, msg=name)


def test_compiled_step_unavailable_falls_back_at_construction_or_raises_when_required(monkeypatch, caplog):
    import target_train.optim as optim_mod

    monkeypatch.setattr(optim_mod, "AUTO_COMPILE_MIN_PARAMS", 0)
    monkeypatch.setattr(
        optim_mod,
        "compiled_step_unavailable",
        lambda *a, **k: "no working C++ compiler for inductor's CPU kernels (InvalidCxxCompiler)",
    )
    caplog.set_level("INFO", logger="target_train.optim")
    model = make_model(torch.float32)
    opt = RepOptSGD(param_groups(model, 1e-3), sgd_masks(model), lr=0.1, momentum=0.9)
    assert not opt.compiled and "C++ compiler" in opt.eager_reason and opt.param_groups[0]["fused"] is True
    warnings = _optim_warnings(caplog)
    assert len(warnings) == 1 and "not available" in warnings[0] and "fused SGD" in warnings[0]
    before = model.stage0.conv.weight.detach().clone()
    feed_grads([model], 0)
    opt.step()
    assert not torch.equal(model.stage0.conv.weight, before)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        RepOptSGD(param_groups(model, 1e-3), sgd_masks(model), lr=0.1, momentum=0.9, compiled=True)


def test_compiled_step_required_raises_when_compilation_fails(monkeypatch):
    import target_train.optim as optim_mod

    def kernel(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(optim_mod, "compiled_step_unavailable", lambda *a, **k: None)
    monkeypatch.setattr(optim_mod, "_masked_sgd_kernel", lambda: kernel)
    model = make_model(torch.float32)
    opt = RepOptSGD(param_groups(model, 1e-3), sgd_masks(model), lr=0.1, momentum=0.9, compiled=True)
    feed_grads([model], 0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all("momentum_buffer" not in opt.state[p] for p in model.parameters())  # nothing half-made is kept


def test_compiled_step_unavailable_reasons():
    from target_train.optim import compiled_step_unavailable

    w = torch.zeros(2, 2)
    assert "dampening" in compiled_step_unavailable([w], dampening=0.1)
    assert "meta" in compiled_step_unavailable([torch.zeros(2, device="meta")])
    assert "torch.int64" in compiled_step_unavailable([torch.zeros(2, dtype=torch.int64)])
    with torch._dynamo.config.patch(disable=True):
        assert "TorchDynamo is disabled" in compiled_step_unavailable([w])
    assert compiled_step_unavailable([w]) is None or "TorchDynamo" not in compiled_step_unavailable([w])


def test_compile_step_is_ignored_with_a_warning_for_adamw(caplog):
    caplog.set_level("WARNING", logger="target_train.optim")
    model = make_model(torch.float32)
    opt = build_optimizer(model, "adamw", 1e-3, 0.05, scales=signed_scales(), compiled=True)
    assert type(opt) is RepOptAdamW
    assert any("only RepOptSGD has a compiled step" in w for w in _optim_warnings(caplog))
