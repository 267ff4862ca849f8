"""The RepOpt-GhostNet SE gate is the official ``hard_sigmoid``, relu6(x + 3) / 6, bit for bit in float64:
``F.hardsigmoid``'s float64 backward multiplies by float32(1/6) (3e-8 off), which the fp64 equivalence
checks would otherwise carry as an error of the gate rather than of the method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from repopt.ghostnet.blocks import SqueezeExcite, hard_sigmoid

pytestmark = pytest.mark.usefixtures("single_thread")


def official_hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3.0) / 6.0


def _inputs(gen: torch.Generator) -> torch.Tensor:
    """Random values over both kinks and beyond, plus the kinks -3 and 3 themselves and their neighbours."""
    kinks = torch.tensor([-3.0, 3.0], dtype=torch.float64)
    near = torch.cat(
        [kinks, kinks.nextafter(kinks - 1), kinks.nextafter(kinks + 1), torch.tensor([0.0, -6.0, 6.0], dtype=torch.float64)]
    )
    return torch.cat([torch.randn(4096, generator=gen, dtype=torch.float64) * 4, near])


def test_gate_forward_and_input_gradient_are_the_official_formula_bitwise():
    gen = torch.Generator().manual_seed(0)
    x = _inputs(gen)
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, out_ref = hard_sigmoid(ours), official_hard_sigmoid(ref)
    (grad,), (grad_ref,) = torch.autograd.grad(out, ours, upstream), torch.autograd.grad(out_ref, ref, upstream)
    assert out.dtype == grad.dtype == torch.float64
    assert torch.equal(out, out_ref)
    assert torch.equal(grad, grad_ref)
    assert torch.equal(grad[-9:-7], torch.zeros(2, dtype=torch.float64))  # flat at the kinks, as relu6's backward


def test_squeeze_excite_gates_with_it():
    """The module's forward and input gradient equal the gate written out with the official formula."""
    torch.manual_seed(0)
    se = SqueezeExcite(16, 0.25).double()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = se(x)
    out_ref = x_ref * official_hard_sigmoid(se.conv_expand(se.act1(se.conv_reduce(se.avg_pool(x_ref)))))
    upstream = torch.randn(out.shape, dtype=torch.float64)
    (grad,), (grad_ref,) = torch.autograd.grad(out, x, upstream), torch.autograd.grad(out_ref, x_ref, upstream)
    assert torch.equal(out, out_ref)
    assert torch.equal(grad, grad_ref)
