"""RepOpt-VGG: plain 3x3 conv -> BN -> ReLU stages whose CSLA form is 3x3 + 1x1 + identity
(docs/design.md, "The model family"). ``FAMILY`` is what the registry (``repopt/family.py``) knows."""

from ..lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(("ArchSpec", "BlockSpec", "SCALE_KINDS", "arch_names", "get_arch"), ".arch"),
    "FAMILY": ".family",
    **dict.fromkeys(("RepOptVGG", "MODES"), ".model"),
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
