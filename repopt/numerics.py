"""How the project compares two results: the relative difference every equivalence bound is stated in."""

from __future__ import annotations

import torch


def rel_diff(out, ref) -> float:
    """max |out - ref| / max |ref|, in float64 (a zero reference counts as 1e-12); no autograd."""
    with torch.no_grad():
        out, ref = torch.as_tensor(out, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
        return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
