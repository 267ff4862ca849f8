"""The training engine shared by stage one and stage two."""

from .callbacks import Callback, active
from .checkpoint import load_checkpoint, save_checkpoint
from .runtime import Runtime, resolve_runtime
from .schedule import build_scheduler
from .step import TrainStep
from .trainer import Interrupted, Trainer

__all__ = [
    "Trainer",
    "TrainStep",
    "Callback",
    "active",
    "Interrupted",
    "Runtime",
    "resolve_runtime",
    "build_scheduler",
    "load_checkpoint",
    "save_checkpoint",
]
