"""Checkpoints: written atomically, read without unpickling arbitrary objects."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..io import safe_torch_load, torch_save


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomic ``torch.save``: a crash mid-write leaves the previous checkpoint intact."""
    torch_save(state, path)


def _verify_zip(path: Path) -> None:
    """torch does not check the zip CRCs on read: a flipped bit in a weight would load silently."""
    if not zipfile.is_zipfile(path):
        return  # legacy (pre-1.6) format: torch's reader validates its own structure
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint archive ({exc}); delete it to start over") from None
    if bad is not None:
        raise CheckpointError(f"{path}: damaged checkpoint ({bad} fails its CRC check); delete it to start over")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; every failure is a CheckpointError naming the file.

    The archive's CRCs are verified first, and the model's floating tensors must be finite (a
    checkpoint is only ever written from a healthy run).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; start without resume=true or point at the run directory that holds last.pt"
        )
    _verify_zip(path)
    state = safe_torch_load(path, CheckpointError, "checkpoint", "delete it to start over", map_location)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or not isinstance(state.get("run"), dict):
        raise CheckpointError(f"{path}: not a checkpoint written by this project (no 'model'/'run' entries)")
    for key, value in state["model"].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: {key} holds non-finite values; the file is damaged — delete it to start over")
    return state
