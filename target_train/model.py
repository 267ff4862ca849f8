"""Stage-two models of any family: the straight-through target and the structural re-param baseline."""

from __future__ import annotations

from torch import nn

from repopt.family import build_model, family_of, get_spec


def build_target_model(arch, num_classes: int) -> nn.Module:
    """The plain target (VGG: 3x3 conv -> BN -> ReLU blocks; GhostNet: no fusion branch)."""
    return build_model(arch, num_classes, mode="target")


def build_baseline_model(arch, num_classes: int) -> nn.Module:
    """The family's structural re-parameterization baseline (RepVGG, RepGhostNet), folded by ``fuse``."""
    spec = get_spec(arch)
    return build_model(spec, num_classes, mode=family_of(spec).baseline_mode)


def build_repvgg_model(arch, num_classes: int) -> nn.Module:
    """RepVGG: multi-branch at training time, folded for deployment by ``fuse``."""
    return build_model(arch, num_classes, mode="repvgg")
