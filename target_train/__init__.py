"""Stage two: train the straight-through target of any family with the RepOptimizer built from a scales file."""

from .handler import fuse, grad_masks, handler_for, reinitialize
from .masks import masks_by_param
from .model import build_baseline_model, build_repvgg_model, build_target_model
from .optim import RepOptAdamW, RepOptSGD, build_optimizer, build_repopt, param_groups

__all__ = [
    "build_target_model",
    "build_baseline_model",
    "build_repvgg_model",
    "handler_for",
    "reinitialize",
    "grad_masks",
    "masks_by_param",
    "param_groups",
    "RepOptSGD",
    "RepOptAdamW",
    "build_optimizer",
    "build_repopt",
    "fuse",
]
