"""RepOpt-VGG: plain 3x3 conv -> BN -> ReLU stages whose CSLA form is 3x3 + 1x1 + identity
(docs/design.md, "The model family"). ``FAMILY`` is what the registry (``repopt/family.py``) knows."""

from .arch import SCALE_KINDS, ArchSpec, BlockSpec, arch_names, get_arch
from .family import FAMILY
from .model import MODES, RepOptVGG

__all__ = ["ArchSpec", "BlockSpec", "SCALE_KINDS", "arch_names", "get_arch", "RepOptVGG", "MODES", "FAMILY"]
