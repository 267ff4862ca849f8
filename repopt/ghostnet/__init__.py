"""RepOpt-GhostNet: RepGhostNet whose parallel fusion BN becomes a learnable scale in Hyper-Search
and is removed from the target (docs/design.md, "The model family")."""

from ..lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(("GhostSpec", "BottleneckSpec", "GHOST_SCALE_KINDS", "ghost_arch_names", "get_ghost_arch"), ".arch"),
    "FAMILY": ".family",
    "RepOptGhostNet": ".model",
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
