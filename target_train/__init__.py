"""Stage two: train the straight-through target of any family with the RepOptimizer built from a scales file."""

from repopt.lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(("fuse", "grad_masks", "handler_for", "reinitialize"), ".handler"),
    "masks_by_param": ".masks",
    **dict.fromkeys(("build_target_model", "build_baseline_model", "build_repvgg_model"), ".model"),
    **dict.fromkeys(("RepOptSGD", "RepOptAdamW", "build_optimizer", "build_repopt", "param_groups"), ".optim"),
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
