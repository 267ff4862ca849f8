"""Check the central claim: CSLA + plain optimizer == target + RepOptimizer, step for step.

A CSLA model (3x3*s_conv + 1x1*s_1x1 + x*s_id, constant conv/1x1 scales, trainable weight-decayed
identity scales) is trained with torch's SGD / AdamW; the plain target, initialised with the fused
CSLA kernels, is trained with RepOptSGD / RepOptAdamW on the same batches. After N steps the fused
CSLA kernels must equal the target's kernels, and the logits must agree.

    python -m target_train.verify --arch tiny --steps 20
    python -m target_train.verify --family ghostnet
    python -m target_train.verify --arch small --prune 0.5    # after channel pruning (VGG)

is this project's ``check_equivalency.py``. It exits with status 1 if a bound is exceeded.
"""

from __future__ import annotations

import argparse
import sys

from repopt.errors import ConfigError
from repopt.family import family_names, family_of, get_spec

SMALL_MEMBER = {"vgg": "tiny", "ghostnet": "ghostnet_tiny"}
OPTIMIZERS = ("sgd", "adamw")
DTYPES = ("float64", "float32")


def _listed(parser: argparse.ArgumentParser, option: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    wrong = [item for item in items if item not in allowed]
    if wrong or not items:
        parser.error(f"{option} {text!r}: a comma list of {', '.join(allowed)}")
    return items


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Every argument checked before torch loads: ``parser.error`` (one line, exit 2) names the wrong one."""
    try:
        spec = get_spec(args.arch)
    except ConfigError as exc:
        parser.error(f"--arch {args.arch}: {exc}")
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be at least 1")
    if args.prune is not None and (family_of(spec).name != "vgg" or not 0 < args.prune < 1):
        parser.error(f"--prune {args.prune}: a ratio in (0, 1), for a VGG architecture (--arch {args.arch})")
    return _listed(parser, "--optimizers", args.optimizers, OPTIMIZERS), _listed(parser, "--dtypes", args.dtypes, DTYPES)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m target_train.verify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", default="tiny", help="architecture name of any family, e.g. tiny, ghostnet_tiny (default: tiny)"
    )
    parser.add_argument(
        "--family",
        choices=family_names(),
        default=None,
        help="check this family's small test member (vgg: tiny, ghostnet: ghostnet_tiny) instead of --arch",
    )
    parser.add_argument("--steps", type=int, default=20, help="training steps (default: 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizers", default="sgd,adamw", help="comma list of sgd, adamw")
    parser.add_argument("--dtypes", default="float64,float32", help="comma list of float64, float32")
    parser.add_argument(
        "--eps",
        type=float,
        default=None,
        help="AdamW eps (default: 1e-16 for vgg, 1e-12 for ghostnet; the CSLA/target difference is an eps effect, see README)",
    )
    parser.add_argument(
        "--prune",
        type=float,
        default=None,
        metavar="RATIO",
        help="VGG: channel-prune both models at RATIO first (masks sliced with the kept channels)",
    )
    args = parser.parse_args(argv)
    if args.family is not None:
        args.arch = SMALL_MEMBER[args.family]
    optimizers, dtypes = check_args(parser, args)
    # the check loads torch: only once the arguments are known to be good (a typo is refused at once)
    import torch

    from .equivalence import DEFAULT_EPS, bound_for, run_equivalence

    ok = True
    print(f"{'optimizer':<9} {'dtype':<8} {'steps':>5} {'weights':>10} {'logits':>10} {'bn':>10}  bound    verdict")
    for name in optimizers:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            eps = DEFAULT_EPS[family_of(get_spec(args.arch)).name] if args.eps is None else args.eps
            r = run_equivalence(args.arch, name, args.steps, dtype, seed=args.seed, eps=eps, prune=args.prune)
            bound = bound_for(args.arch, name, dtype)
            verdict = "(reported)" if bound is None else "ok" if r.passed(bound) else "FAIL"
            ok &= bound is None or r.passed(bound)
            print(
                f"{name:<9} {r.dtype:<8} {r.steps:>5} {r.weight_rel_diff:>10.2e} {r.logit_rel_diff:>10.2e} "
                f"{r.bn_rel_diff:>10.2e}  {'—' if bound is None else f'{bound:.0e}':>5}  {verdict}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
