"""Check the central claim: CSLA + plain optimizer == target + RepOptimizer, step for step.

A CSLA model (3x3*s_conv + 1x1*s_1x1 + x*s_id, constant conv/1x1 scales, trainable weight-decayed
identity scales) is trained with torch's SGD / AdamW; the plain target, initialised with the fused
CSLA kernels, is trained with RepOptSGD / RepOptAdamW on the same batches. After N steps the fused
CSLA kernels must equal the target's kernels, and the logits must agree.

    python -m target_train.verify --arch tiny --steps 20

is this project's ``check_equivalency.py``. It exits with status 1 if a bound is exceeded.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from hypersearch.model import build_hs_model
from repopt.arch import get_arch
from repopt.engine import Runtime, TrainStep
from repopt.numerics import rel_diff
from repopt.scales import random_scales

from .masks import grad_masks, masks_by_param
from .model import build_target_model
from .optim import RepOptAdamW, RepOptSGD, param_groups

# The bounds the tests prove (max relative difference; see README "Equivalence").
BOUNDS = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass
class Result:
    optimizer: str
    dtype: str
    steps: int
    weight_rel_diff: float  # max over blocks of max|W_csla - W_target| / max|W_target|
    logit_rel_diff: float  # eval-mode logits on a held-out batch
    bn_rel_diff: float  # BN affine params and running stats

    def passed(self, bound: float) -> bool:
        return max(self.weight_rel_diff, self.logit_rel_diff, self.bn_rel_diff) <= bound


@torch.no_grad()
def paired_models(arch, num_classes: int, scales, dtype, seed: int):
    """A CSLA model with the given scales and a target model holding its fused kernels."""
    torch.manual_seed(seed)
    csla = build_hs_model(arch, num_classes, mode="csla").to(dtype)
    for key, param in csla.scale_parameters().items():
        if key in scales:
            param.copy_(scales[key].to(dtype))
    # non-trivial BN affine params so that BN is exercised
    for module in csla.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)
    target = build_target_model(arch, num_classes).to(dtype)
    blocks = dict(csla.blocks())
    for spec, block in target.blocks():
        block.conv.weight.copy_(blocks[spec].fused_kernel())
        block.bn.load_state_dict(blocks[spec].bn.state_dict())
    target.linear.load_state_dict(csla.linear.state_dict())
    return csla, target


def run_equivalence(arch="tiny", optimizer: str = "sgd", steps: int = 20, dtype=torch.float64, *, seed: int = 0,
                    num_classes: int = 10, image_size: int = 16, batch_size: int = 8, lr: float | None = None,
                    momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 1e-3, eps: float = 1e-16,
                    strides=(1, 2, 1, 2, 2)) -> Result:
    """Train the CSLA/target pair for ``steps`` steps and report the relative differences."""
    arch = get_arch(arch, strides=strides)
    gen = torch.Generator().manual_seed(seed)
    scales = random_scales(arch, gen)
    csla, target = paired_models(arch, num_classes, scales, dtype, seed)
    masks = masks_by_param(target, grad_masks(target, scales, rule=optimizer))
    if optimizer == "sgd":
        lr = 0.01 if lr is None else lr
        opt_csla = torch.optim.SGD(param_groups(csla, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov)
        opt_target = RepOptSGD(param_groups(target, weight_decay), masks, lr=lr, momentum=momentum, nesterov=nesterov)
    elif optimizer == "adamw":
        lr = 1e-3 if lr is None else lr
        opt_csla = torch.optim.AdamW(param_groups(csla, weight_decay), lr=lr, eps=eps)
        opt_target = RepOptAdamW(param_groups(target, weight_decay), masks, lr=lr, eps=eps)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")

    csla.train()
    target.train()
    runtime = Runtime(torch.device("cpu"), amp_dtype=None, channels_last=False)
    train_steps = [TrainStep(csla, opt_csla, runtime), TrainStep(target, opt_target, runtime)]  # the trainer's step
    for _ in range(steps):
        x = torch.randn(batch_size, 3, image_size, image_size, generator=gen, dtype=torch.float64).to(dtype)
        y = torch.randint(0, num_classes, (batch_size,), generator=gen)
        for train_step in train_steps:
            train_step(x, y)

    with torch.no_grad():
        blocks = dict(csla.blocks())
        weight = max(rel_diff(blocks[s].fused_kernel(), b.conv.weight) for s, b in target.blocks())
        bn = max(
            rel_diff(t, c)
            for s, b in target.blocks()
            for t, c in zip(b.bn.state_dict().values(), blocks[s].bn.state_dict().values())
            if t.is_floating_point()
        )
        csla.eval()
        target.eval()
        x = torch.randn(batch_size, 3, image_size, image_size, generator=gen, dtype=torch.float64).to(dtype)
        logits = rel_diff(target(x), csla(x))
    return Result(optimizer, str(dtype).replace("torch.", ""), steps, weight, logits, bn)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m target_train.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", help="architecture name (default: tiny)")
    parser.add_argument("--steps", type=int, default=20, help="training steps (default: 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizers", default="sgd,adamw", help="comma list of sgd, adamw")
    parser.add_argument("--dtypes", default="float64,float32", help="comma list of float64, float32")
    parser.add_argument("--eps", type=float, default=1e-16,
                        help="AdamW eps (default 1e-16: the CSLA/target difference is an eps effect, see README)")
    args = parser.parse_args(argv)

    ok = True
    print(f"{'optimizer':<9} {'dtype':<8} {'steps':>5} {'weights':>10} {'logits':>10} {'bn':>10}  bound    verdict")
    for name in args.optimizers.split(","):
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            r = run_equivalence(args.arch, name, args.steps, dtype, seed=args.seed, eps=args.eps)
            bound = BOUNDS[dtype]
            verdict = "ok" if r.passed(bound) else "FAIL"
            ok &= r.passed(bound)
            print(f"{name:<9} {r.dtype:<8} {r.steps:>5} {r.weight_rel_diff:>10.2e} {r.logit_rel_diff:>10.2e} "
                  f"{r.bn_rel_diff:>10.2e}  {bound:.0e}  {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
