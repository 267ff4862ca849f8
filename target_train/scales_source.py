"""What ``scales=`` means in stage two: a file, a run directory, ``official:X``, ``none`` or ``init``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from repopt.arch import ArchSpec
from repopt.errors import ScalesError
from repopt.io import read_json
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

    def identity(self) -> dict:
        """What makes two runs' scales the same: their kind and the sha256 of the file read (not its path)."""
        return {"kind": self.kind, "sha256": self.file.sha256 if self.file else None}


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
    check_recorded_hash(file)
    return ScalesChoice("official" if text.startswith(OFFICIAL_PREFIX) else "file", file.tensors, file)


def check_recorded_hash(file: ScalesFile) -> None:
    """A scales file inside a stage-one run must be the file that run wrote: its sha256 is recorded in
    the ``metrics.json`` beside it, and a file that differs (a flipped bit, a file copied over it) is
    refused rather than trained with."""
    recorded = read_json(file.path.parent / "metrics.json")
    if not isinstance(recorded, dict) or recorded.get("stage") != "hypersearch" or not recorded.get("scales_sha256"):
        return
    if recorded.get("scales_file") and Path(recorded["scales_file"]).name != file.path.name:
        return
    if recorded["scales_sha256"] != file.sha256:
        raise ScalesError(f"{file.path}: differs from the file its stage-one run wrote (sha256 {file.sha256[:12]}..., "
                          f"recorded {recorded['scales_sha256'][:12]}... in {file.path.parent / 'metrics.json'}); the file "
                          f"was damaged or replaced. Re-run stage one (resume=true re-exports it) or give another scales file")
