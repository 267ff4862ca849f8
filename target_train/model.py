"""Stage-two models: the straight-through RepOpt-VGG target and the RepVGG baseline."""

from __future__ import annotations

from repopt.arch import ArchSpec
from repopt.vgg import RepOptVGG


def build_target_model(arch: ArchSpec | str, num_classes: int) -> RepOptVGG:
    """Plain VGG: every block is 3x3 conv (no bias) -> BN -> ReLU."""
    return RepOptVGG(arch, num_classes, mode="target")


def build_repvgg_model(arch: ArchSpec | str, num_classes: int) -> RepOptVGG:
    """RepVGG: multi-branch at training time, folded for deployment by ``fuse``."""
    return RepOptVGG(arch, num_classes, mode="repvgg")
