"""Deploy folding: every training-time mode folds into a conv(+bias)/ReLU stack with equal outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repopt.numerics import rel_diff
from repopt.vgg import RepOptVGG
from repopt.vgg.arch import get_arch
from repopt.vgg.blocks import DeployBlock
from target_train import build_repvgg_model, build_target_model, fuse
from target_train.families.vgg import fold_block

MODES = ("target", "repvgg", "hs", "csla")
STRIDES = (None, (1, 1, 2, 2, 2))
ALLOWED_LEAVES = (nn.Conv2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Linear)


pytestmark = pytest.mark.usefixtures("single_thread")


def make_trained_like(mode, strides, dtype, seed=0, arch_name="tiny", fused_forward=False):
    """A model whose BN statistics, affine parameters and scales are far from their init values,
    while the activations stay input-dependent (the running statistics come from real batches)."""
    torch.manual_seed(seed)
    arch = get_arch(arch_name, strides=strides)
    model = RepOptVGG(arch, 10, mode=mode, fused_forward=fused_forward).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(1.0 + 0.4 * rnd(bn.weight))
            bn.bias.copy_(0.2 * rnd(bn.bias))
            bn.momentum = None  # cumulative average over the passes below
        for name, p in model.named_parameters():
            if ".scale_" in name:
                p.copy_(rnd(p))  # signed scales
        model.linear.bias.copy_(0.1 * rnd(model.linear.bias))
        model.train()
        for _ in range(3):  # training-mode passes set the running statistics
            model(torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64).to(dtype))
        for bn in bns:
            bn.momentum = 0.1
            # then move them off the data statistics a little
            bn.running_mean.add_(0.2 * rnd(bn.running_mean) * bn.running_var.sqrt())
            bn.running_var.mul_(torch.exp(0.3 * rnd(bn.running_var)))
    return model


@pytest.mark.parametrize("strides", STRIDES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_fused_outputs_equal(mode, strides, dtype, tol):
    model = make_trained_like(mode, strides, dtype)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(dtype)
    deployed = fuse(model)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        out = deployed(x)
    assert out.dtype == dtype and out.shape == (5, 10)
    # a non-degenerate comparison: the outputs depend on the input, not only on the biases
    assert (ref - ref.mean(0)).abs().max() > 0.05 * ref.abs().max()
    assert rel_diff(out, ref) <= tol


@pytest.mark.parametrize("mode", MODES)
def test_fused_model_structure(mode):
    model = make_trained_like(mode, (1, 1, 2, 2, 2), torch.float32)
    was_training = model.training
    deployed = fuse(model)
    assert model.training == was_training  # the source model is left as it was
    assert isinstance(deployed, RepOptVGG) and deployed.mode == "deploy"
    assert not deployed.training
    for name, module in deployed.named_modules():
        if len(list(module.children())) == 0:
            assert isinstance(module, ALLOWED_LEAVES), f"{name}: {type(module).__name__}"
        assert not isinstance(module, nn.BatchNorm2d)
    convs = [m for m in deployed.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(model.arch.blocks)
    assert all(c.kernel_size == (3, 3) and c.bias is not None for c in convs)
    assert [c.stride[0] for c in convs] == [b.stride for b in model.arch.blocks]
    assert all(isinstance(b, DeployBlock) for _, b in deployed.blocks())
    # the linear head is copied exactly
    assert torch.equal(deployed.linear.weight, model.linear.weight)
    assert torch.equal(deployed.linear.bias, model.linear.bias)
    # fused weights are copies, not views of the trained weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    again = fuse(model)
    assert not torch.equal(again.stage0.conv.weight, deployed.stage0.conv.weight)


def test_repvgg_identity_blocks_covered():
    model = make_trained_like("repvgg", (1, 1, 2, 2, 2), torch.float64, seed=3)
    identity_blocks = [spec.name for spec, b in model.blocks() if hasattr(b, "rbr_identity")]
    assert "stage1.0" in identity_blocks and "stage1.1" in identity_blocks and "stage2.1" in identity_blocks
    model.eval()
    # block by block: the folded conv equals the block before its ReLU
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    block = model.stage1[0]
    kernel, bias = fold_block(block)
    with torch.no_grad():
        pre_relu = block.rbr_dense(x) + block.rbr_1x1(x) + block.rbr_identity(x)
        folded = torch.nn.functional.conv2d(x, kernel, bias, 1, 1)
    torch.testing.assert_close(folded, pre_relu, rtol=1e-12, atol=1e-12)
    # dropping the identity term would be visibly wrong
    with torch.no_grad():
        assert (pre_relu - block.rbr_identity(x) - folded).abs().max() > 1e-2


def test_hs_block_fold_with_identity():
    model = make_trained_like("hs", (1, 1, 2, 2, 2), torch.float64, seed=4).eval()
    block = model.stage1[0]
    assert block.has_identity
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kernel, bias = fold_block(block)
    with torch.no_grad():
        ref = block.bn(block.scale_conv(block.conv(x)) + block.scale_1x1(block.conv_1x1(x)) + block.scale_identity(x))
        out = torch.nn.functional.conv2d(x, kernel, bias, 1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_hs_fused_forward_model_folds():
    model = make_trained_like("hs", (1, 1, 2, 2, 2), torch.float64, seed=5, fused_forward=True).eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_diff(fuse(model)(x), model(x)) <= 1e-10


class _DDPLike(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


@pytest.mark.parametrize("mode", ["target", "repvgg"])
def test_fuse_wrapped_model(mode):
    model = make_trained_like(mode, None, torch.float64, seed=6)
    wrapper = _DDPLike(model)
    deployed = fuse(wrapper)
    assert isinstance(deployed, RepOptVGG) and deployed.mode == "deploy"
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        assert rel_diff(deployed(x), model(x)) <= 1e-10
    # a plain object with a .module attribute works too
    holder = type("Holder", (), {})()
    holder.module = model
    with torch.no_grad():
        assert torch.equal(fuse(holder)(x), deployed(x))


def test_fuse_deploy_model_is_identity_operation():
    model = make_trained_like("target", None, torch.float64, seed=8)
    once = fuse(model)
    twice = fuse(once)
    for (n1, p1), (n2, p2) in zip(once.state_dict().items(), twice.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_builders_modes():
    assert build_target_model("tiny", 10).mode == "target"
    assert build_repvgg_model("tiny", 10).mode == "repvgg"
    with pytest.raises(TypeError):
        fold_block(nn.Linear(2, 2))
