"""What ``scales=`` means in stage two: a file, a run directory, ``official:X``, ``none`` or ``init``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from repopt.arch import ArchSpec
from repopt.scales import OFFICIAL_PREFIX, ScalesFile, read_scales


@dataclass
class ScalesChoice:
    """The scales a run uses (None: plain optimizer) and, for a file, the one read that produced them."""

    kind: str  # file | official | init | none
    scales: dict[str, torch.Tensor] | None
    file: ScalesFile | None = None

    def describe(self) -> dict:
        """The provenance recorded in the run's metrics: kind, path, sha256 and metadata of the file read."""
        f = self.file
        return {"kind": self.kind, "path": str(f.path) if f else None, "sha256": f.sha256 if f else None,
                "metadata": dict(f.metadata) if f else {}}


def is_unused(spec: str | None) -> bool:
    """True for the specs that name no scales (``none`` or null)."""
    return spec is None or str(spec).strip().lower() == "none"


def resolve_scales(spec: str | None, arch: ArchSpec) -> ScalesChoice:
    """Load and validate the scales named by ``spec`` for ``arch`` (pre-flight, before any training)."""
    if is_unused(spec):
        return ScalesChoice("none", None)
    text = str(spec).strip()
    if text.lower() == "init":
        return ScalesChoice("init", arch.init_scales())
    file = read_scales(text, arch)
    return ScalesChoice("official" if text.startswith(OFFICIAL_PREFIX) else "file", file.tensors, file)
