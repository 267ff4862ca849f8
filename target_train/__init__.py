"""Stage two: train the straight-through RepOpt-VGG with the RepOptimizer built from a scales file."""

from .fuse import fuse
from .masks import grad_masks, masks_by_param
from .model import build_repvgg_model, build_target_model
from .optim import RepOptAdamW, RepOptSGD, build_optimizer, build_repopt, param_groups
from .reinit import reinitialize

__all__ = [
    "build_target_model", "build_repvgg_model", "reinitialize", "grad_masks", "masks_by_param",
    "param_groups", "RepOptSGD", "RepOptAdamW", "build_optimizer", "build_repopt", "fuse",
]
