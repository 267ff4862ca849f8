"""Checkpoints: written atomically, read without unpickling arbitrary objects."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..io import torch_save


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomic ``torch.save``: a crash mid-write leaves the previous checkpoint intact."""
    torch_save(state, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; every failure is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; start without resume=true or point at the run directory that holds last.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it needs more than tensors and plain containers to unpickle, and "
            f"loading it could run code ({str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, AttributeError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: damaged or truncated checkpoint ({type(exc).__name__}: {str(exc)[:200]}); delete it to start over") from None
    if not isinstance(state, dict) or "model" not in state or "run" not in state:
        raise CheckpointError(f"{path}: not a checkpoint written by this project (no 'model'/'run' entries)")
    return state
