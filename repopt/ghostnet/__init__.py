"""RepOpt-GhostNet: RepGhostNet whose parallel fusion BN becomes a learnable scale in Hyper-Search
and is removed from the target (docs/design.md, "The model family")."""

from .arch import GHOST_SCALE_KINDS, BottleneckSpec, GhostSpec, get_ghost_arch, ghost_arch_names
from .family import FAMILY
from .model import RepOptGhostNet

__all__ = ["GhostSpec", "BottleneckSpec", "GHOST_SCALE_KINDS", "ghost_arch_names", "get_ghost_arch", "RepOptGhostNet", "FAMILY"]
