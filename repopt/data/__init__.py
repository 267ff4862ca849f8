"""Data sets as deterministic, resumable batch streams on the device; ``build_data`` is the entry point."""

from .build import build_data
from .types import Batches, DataBundle

__all__ = ["build_data", "DataBundle", "Batches"]
