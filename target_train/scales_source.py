"""What ``scales=`` means in stage two: a file, a run directory, ``official:X``, ``none`` or ``init``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from repopt.arch import ArchSpec
from repopt.io import sha256_file
from repopt.scales import OFFICIAL_PREFIX, load_scales, read_metadata, resolve_scales_path

BASELINES = ("none", "init")


@dataclass
class ScalesChoice:
    """The scales a run uses (None: plain optimizer) and the provenance recorded with the run."""

    kind: str  # file | official | init | none
    scales: dict[str, torch.Tensor] | None
    path: str | None = None
    sha256: str | None = None
    metadata: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "sha256": self.sha256, "metadata": self.metadata}


def resolve_scales(spec: str | None, arch: ArchSpec) -> ScalesChoice:
    """Load and validate the scales named by ``spec`` for ``arch`` (pre-flight, before any training)."""
    text = "none" if spec is None else str(spec).strip()
    if text.lower() == "none":
        return ScalesChoice("none", None)
    if text.lower() == "init":
        return ScalesChoice("init", arch.init_scales())
    path = resolve_scales_path(text)
    scales = load_scales(path, arch)
    kind = "official" if text.startswith(OFFICIAL_PREFIX) else "file"
    return ScalesChoice(kind, scales, str(path), sha256_file(path), read_metadata(path))
