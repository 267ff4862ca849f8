"""Stage-two models of any family: the straight-through target and the structural re-param baseline."""

from __future__ import annotations

from torch import nn

from repopt.errors import ConfigError
from repopt.family import build_model, family_of, get_spec


def build_target_model(arch, num_classes: int) -> nn.Module:
    """The plain target (VGG: 3x3 conv -> BN -> ReLU blocks; GhostNet: no fusion branch)."""
    return build_model(arch, num_classes, mode="target")


def build_baseline_model(arch, num_classes: int, mode: str | None = None) -> nn.Module:
    """A structural re-parameterization baseline of the family, folded by ``fuse``: ``mode`` (VGG:
    repvgg or qarepvgg), by default the family's main one (RepVGG, RepGhostNet)."""
    spec = get_spec(arch)
    family = family_of(spec)
    mode = family.baseline_mode if mode is None else mode
    if mode not in family.baseline_modes:
        raise ConfigError(f"{mode!r} is not a {family.name} baseline; choose one of {', '.join(family.baseline_modes)}")
    return build_model(spec, num_classes, mode=mode)


def build_repvgg_model(arch, num_classes: int) -> nn.Module:
    """RepVGG: multi-branch at training time, folded for deployment by ``fuse``."""
    return build_model(arch, num_classes, mode="repvgg")
