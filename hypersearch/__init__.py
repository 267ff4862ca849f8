"""Stage one: Hyper-Search — train CSLA with learnable scales and export them."""

from repopt.lazy import lazy_exports

_WHERE = {"build_hs_model": ".model", "extract_scales": ".model"}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
