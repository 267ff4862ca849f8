"""The central claim: CSLA + plain optimizer == target + RepOptimizer (docs/design.md, "The math")."""

import pytest
import torch
import torch.nn.functional as F

from repopt.vgg.arch import BlockSpec
from repopt.vgg.blocks import CSLABlock, TargetBlock
from target_train.equivalence import BOUNDS, run_equivalence
from target_train.families.vgg import block_mask
from target_train.optim import RepOptAdamW, RepOptSGD, param_groups

STEPS = 20


def _signed(n, gen, low=0.2, high=1.5):
    mag = low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)
    return mag * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()


def _train_block_pair(spec: BlockSpec, optimizer: str, dtype, eps=1e-16, steps=STEPS, seed=0):
    """Train one CSLA block and one target block on the same random regression task."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    csla = CSLABlock(spec, mode="csla").to(dtype)
    target = TargetBlock(spec).to(dtype)
    s_conv, s_1x1 = _signed(spec.out_channels, gen), _signed(spec.out_channels, gen)
    s_id = _signed(spec.out_channels, gen) if spec.has_identity else None
    with torch.no_grad():
        csla.scale_conv.weight.copy_(s_conv)
        csla.scale_1x1.weight.copy_(s_1x1)
        if s_id is not None:
            csla.scale_identity.weight.copy_(s_id)
        target.conv.weight.copy_(csla.fused_kernel())
        target.bn.load_state_dict(csla.bn.state_dict())
        w0 = target.conv.weight.clone()
    rule = "sgd" if optimizer == "sgd" else "adamw"
    mask = block_mask(s_conv, s_1x1, s_id, spec.in_channels, rule).to(dtype)
    if optimizer == "sgd":
        opt_c = torch.optim.SGD(param_groups(csla, 1e-3), lr=0.005, momentum=0.9, nesterov=True)
        opt_t = RepOptSGD(param_groups(target, 1e-3), {target.conv.weight: mask}, lr=0.005, momentum=0.9, nesterov=True)
    else:
        opt_c = torch.optim.AdamW(param_groups(csla, 1e-2), lr=1e-3, eps=eps)
        opt_t = RepOptAdamW(param_groups(target, 1e-2), {target.conv.weight: mask}, lr=1e-3, eps=eps)
    size = 8
    out_size = size // spec.stride
    proj = torch.randn(spec.out_channels, out_size, out_size, generator=gen, dtype=torch.float64).to(dtype)
    for _ in range(steps):
        x = torch.randn(4, spec.in_channels, size, size, generator=gen, dtype=torch.float64).to(dtype)
        for model, opt in ((csla, opt_c), (target, opt_t)):
            opt.zero_grad()
            ((model(x) * proj).sum(dim=(1, 2, 3)) ** 2).mean().backward()
            opt.step()
    with torch.no_grad():
        w_c, w_t = csla.fused_kernel(), target.conv.weight
        # the weights really moved, so the comparison is not vacuous
        assert float((w_t - w0).abs().max() / w0.abs().max()) > 1e-3
        rel_w = float((w_c - w_t).abs().max() / w_t.abs().max())
        csla.eval(), target.eval()
        x = torch.randn(4, spec.in_channels, size, size, generator=gen, dtype=torch.float64).to(dtype)
        rel_out = float((csla(x) - target(x)).abs().max() / target(x).abs().max())
    return rel_w, rel_out


BLOCKS = {
    "identity": BlockSpec("b", 1, 1, 6, 6, 1),
    "no_identity": BlockSpec("b", 1, 0, 4, 6, 1),
    "stride2": BlockSpec("b", 1, 0, 6, 6, 2),
}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_single_block_equivalence(kind, dtype, optimizer):
    rel_w, rel_out = _train_block_pair(BLOCKS[kind], optimizer, dtype)
    assert rel_w <= BOUNDS[dtype], rel_w
    assert rel_out <= BOUNDS[dtype], rel_out


def test_identity_block_trains_identity_scale():
    """Without the +1 identity term in the mask the pair drifts apart: the test can fail."""
    spec = BLOCKS["identity"]
    gen = torch.Generator().manual_seed(0)
    s_conv, s_1x1, s_id = (_signed(6, gen) for _ in range(3))
    wrong = block_mask(s_conv, s_1x1, None, 6, "sgd")
    right = block_mask(s_conv, s_1x1, s_id, 6, "sgd")
    assert torch.allclose((right - wrong)[:, :, 1, 1], torch.eye(6, dtype=right.dtype), rtol=0, atol=1e-12)
    assert spec.has_identity


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_whole_model_equivalence(optimizer, dtype):
    r = run_equivalence("tiny", optimizer, STEPS, dtype)
    assert r.weight_rel_diff <= BOUNDS[dtype]
    assert r.logit_rel_diff <= BOUNDS[dtype]
    assert r.bn_rel_diff <= BOUNDS[dtype]


def test_whole_small_model_sgd_fp64():
    """The deeper 'small' arch (identity blocks, stride-1 and stride-2 stages), 20 steps, fp64."""
    r = run_equivalence("small", "sgd", STEPS, torch.float64)
    assert max(r.weight_rel_diff, r.logit_rel_diff, r.bn_rel_diff) <= 1e-10


def test_adamw_difference_is_an_eps_effect():
    """The only CSLA/target difference under AdamW is eps (CSLA branch b sees eps/|s_b|): linear in eps."""
    big = run_equivalence("tiny", "adamw", STEPS, torch.float64, eps=1e-10).weight_rel_diff
    small = run_equivalence("tiny", "adamw", STEPS, torch.float64, eps=1e-12).weight_rel_diff
    assert 50 < big / small < 200
    assert small <= 1e-7


def test_equivalence_fails_with_wrong_masks():
    """Plain SGD on the target (no masks) is NOT equivalent: the check has teeth."""
    from target_train import equivalence

    original = equivalence.grad_masks

    def ones(model, scales, rule="sgd"):
        return {k: torch.ones_like(v) for k, v in original(model, scales, rule).items()}

    equivalence.grad_masks = ones
    try:
        r = run_equivalence("tiny", "sgd", STEPS, torch.float64)
    finally:
        equivalence.grad_masks = original
    assert r.weight_rel_diff > 1e-3


def test_adamw_signed_mask_would_be_wrong():
    """With negative scales |a|+|b|+1 differs from |a+b+1| (the official signed-scale bug)."""
    a = torch.tensor([-1.0, 0.5])
    b = torch.tensor([0.7, -0.2])
    mask = block_mask(a, b, torch.ones(2), 2, "adamw")
    assert torch.allclose(mask[0, 0, 1, 1], torch.tensor(1.0 + 0.7 + 1.0))
    assert not torch.allclose(mask[0, 0, 1, 1], (a[0] + b[0] + 1).abs())


def test_verify_cli_reports_and_passes(capsys):
    from target_train.verify import main

    assert main(["--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "sgd" in out and "adamw" in out and "FAIL" not in out
    assert F is not None
