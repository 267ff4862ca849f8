"""Stage one: Hyper-Search — train CSLA with learnable scales and export them."""

from .model import build_hs_model, extract_scales

__all__ = ["build_hs_model", "extract_scales"]
