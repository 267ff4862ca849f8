"""``deploy.pt``: the folded conv+ReLU model as a ``torch.export`` program.

It loads with torch alone, no import of this package (torch.export wants a ``.pt2`` name or a
file object, so open the file yourself)::

    with open("deploy.pt", "rb") as f:
        model = torch.export.load(f).module()

The batch dimension is dynamic.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from repopt.errors import ConfigError
from repopt.io import atomic_path
from repopt.modules import unwrap
from repopt.numerics import rel_diff

from .handler import fuse

MAX_REL_DIFF = 1e-4  # a deployed or exported model must reproduce the trained one's logits to this


def cpu_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of ``model`` (unwrapped) on the CPU in float32 and the default memory format."""
    return copy.deepcopy(unwrap(model)).to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval()


def export_deployed(model, path: Path, image_size: int) -> dict:
    """Fold a CPU fp32 copy of ``model``, export it, reload it and check its logits against the copy's."""
    reference = cpu_fp32(model)
    return save_deployed(fuse(reference), reference, path, image_size)


def save_deployed(deployed: torch.nn.Module, reference: torch.nn.Module, path: Path, image_size: int) -> dict:
    """Export ``deployed`` (a folded CPU fp32 model) as a torch.export program, reload it and check
    its logits against ``reference``'s (the model it was folded from)."""
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(deployed, (x,), dynamic_shapes={"x": {0: batch}})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.export.save(program, f)
    with torch.no_grad():
        diff = rel_diff(load_deployed(path)(x), reference(x))
    if not diff <= MAX_REL_DIFF:
        raise ConfigError(f"{path.name} does not reproduce the trained model (max rel diff {diff:.2e})")
    return {"deploy_file": str(path), "deploy_max_rel_diff": diff}


def load_deployed(path) -> torch.nn.Module:
    """Load a ``deploy.pt`` written by ``export_deployed``."""
    with open(path, "rb") as f:
        return torch.export.load(f).module()
