"""``deploy.pt``: the folded conv+ReLU model as a ``torch.export`` program.

It loads with torch alone, no import of this package (torch.export wants a ``.pt2`` name or a
file object, so open the file yourself)::

    with open("deploy.pt", "rb") as f:
        model = torch.export.load(f).module()

The batch dimension is dynamic.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from repopt.io import atomic_path

from .fuse import fuse


def export_deployed(model, path: Path, image_size: int, example_batch: int = 2) -> dict:
    """Fold ``model`` on the CPU in fp32, export it, reload it and compare logits with ``model``."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    was_training = model.training
    model.eval()
    cpu_model = _cpu_copy(model)
    deployed = fuse(cpu_model)
    x = torch.randn(max(example_batch, 2), 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(deployed, (x,), dynamic_shapes={"x": {0: batch}})
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    reloaded = load_deployed(path)
    with torch.no_grad():
        reference = cpu_model(x)
        out = reloaded(x)
    model.train(was_training)
    diff = float((out - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
    return {"deploy_file": str(path), "deploy_max_rel_diff": diff}


def load_deployed(path) -> torch.nn.Module:
    """Load a ``deploy.pt`` written by ``export_deployed``."""
    with open(path, "rb") as f:
        return torch.export.load(f).module()


def _cpu_copy(model):
    import copy

    clone = copy.deepcopy(model).to("cpu", torch.float32)
    return clone.to(memory_format=torch.contiguous_format).eval()
