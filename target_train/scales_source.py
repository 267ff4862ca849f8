"""What ``scales=`` means in stage two: a file, a run directory, ``official:X``, ``none``, ``init``,
``ones`` or ``official_mean[:X]``, and the ablation's ``scales_transform`` applied to them. For an
official HS checkpoint, ``scales_from`` picks its ``model`` state dict (the official extraction) or
its ``ema``.

The constants of the paper's ablation (its Table 4), besides the searched scales: ``init`` (the HS
initialization), ``ones`` (every scale 1), ``channel_mean`` (a transform: each layer's scales
replaced by their mean over channels) and ``official_mean`` (the released scales of the official
member with the same scale keys, B1 for B1cpu, averaged per layer over channels and broadcast to
the target's widths: the layer-wise structure of a full 240-epoch search at no search cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from repopt.errors import ScalesError
from repopt.family import get_spec
from repopt.io import read_json
from repopt.scales import OFFICIAL_PREFIX, ScalesFile, official_names, read_scales
from repopt.vgg.arch import ArchSpec


@dataclass
class ScalesChoice:
    """The scales a run uses (None: plain optimizer) and, for a file, the one read that produced them."""

    kind: str  # file | official | init | ones | official_mean | none
    scales: dict[str, torch.Tensor] | None
    file: ScalesFile | None = None
    transform: str = "none"  # none | channel_mean
    scales_from: str = "model"  # model | ema: the state dict of an HS checkpoint the scales came from

    def describe(self) -> dict:
        """The provenance recorded in the run's metrics: kind, path, sha256 and metadata of the file read,
        and the checkpoint state dict the scales came from."""
        f = self.file
        return {
            "kind": self.kind,
            "path": str(f.path) if f else None,
            "sha256": f.sha256 if f else None,
            "transform": self.transform,
            "scales_from": self.scales_from,
            "metadata": dict(f.metadata) if f else {},
        }

    def identity(self) -> dict:
        """What makes two runs' scales the same: their kind and the sha256 of the file read (not its path),
        and which of its state dicts when not ``model``: one checkpoint holds two sets of scales."""
        identity = {"kind": self.kind, "sha256": self.file.sha256 if self.file else None}
        if self.scales_from != "model":
            identity["scales_from"] = self.scales_from
        return identity if self.transform == "none" else {**identity, "transform": self.transform}


def is_unused(spec: str | None) -> bool:
    """True for the specs that name no scales (``none`` or null)."""
    return spec is None or str(spec).strip().lower() == "none"


OFFICIAL_MEAN = "official_mean"


def resolve_scales(spec: str | None, arch: ArchSpec, transform: str = "none", scales_from: str = "model") -> ScalesChoice:
    """Load and validate the scales named by ``spec`` for ``arch`` (pre-flight, before any training),
    then apply ``transform`` (``none`` | ``channel_mean``). ``scales_from`` (``model`` | ``ema``) picks
    the state dict of an HS checkpoint; the constants (``init``, ``ones``, ``official_mean``) ignore it."""
    choice = _resolve(spec, arch, scales_from)
    if transform == "channel_mean" and choice.scales is not None:
        choice = ScalesChoice(choice.kind, channel_mean(choice.scales), choice.file, transform, choice.scales_from)
    return choice


def _resolve(spec: str | None, arch: ArchSpec, scales_from: str = "model") -> ScalesChoice:
    if is_unused(spec):
        return ScalesChoice("none", None)
    text = str(spec).strip()
    if text.lower() == "init":
        return ScalesChoice("init", arch.init_scales())
    if text.lower() == "ones":
        return ScalesChoice("ones", {k: torch.ones_like(v) for k, v in arch.init_scales().items()})
    if text.lower().split(":", 1)[0] == OFFICIAL_MEAN:
        member = official_member(arch, text.partition(":")[2])
        file = read_scales(OFFICIAL_PREFIX + member, get_spec(member))
        return ScalesChoice(OFFICIAL_MEAN, broadcast_means(file.tensors, arch), file)
    file = read_scales(text, arch, scales_from)
    check_recorded_hash(file)
    kind = "official" if text.startswith(OFFICIAL_PREFIX) else "file"
    return ScalesChoice(kind, file.tensors, file, scales_from=scales_from)


def channel_mean(scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each scale vector replaced by its mean over channels (the ablation "average across channels")."""
    return {k: torch.full_like(v, float(v.mean())) for k, v in scales.items()}


def broadcast_means(scales: dict[str, torch.Tensor], arch: ArchSpec) -> dict[str, torch.Tensor]:
    """Each layer's mean of ``scales`` as a constant vector of ``arch``'s width for that layer."""
    shapes = arch.scale_shapes()
    return {k: torch.full(shapes[k], float(scales[k].mean()), dtype=torch.float32) for k in shapes}


def official_member(arch: ArchSpec, name: str = "") -> str:
    """The released member whose scale keys are ``arch``'s (B1 for B1cpu), or ``name`` checked to have them."""
    keys = set(arch.scale_shapes())
    candidates = [n for n in official_names() if set(get_spec(n).scale_shapes()) == keys]
    if name:
        match = [c for c in candidates if c.lower() == name.lower()]
        if not match:
            raise ScalesError(
                f"scales=official_mean:{name}: the released {name} scales do not have the scale keys of arch "
                f"{arch.name} (its layers differ); members that fit: {', '.join(candidates) or 'none'}"
            )
        return match[0]
    if not candidates:
        raise ScalesError(
            f"scales=official_mean: no released member has the layers of arch {arch.name} "
            f"(released: {', '.join(official_names())}); give scales=official_mean:<member> of the same layout"
        )
    return candidates[0]


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
        raise ScalesError(
            f"{file.path}: differs from the file its stage-one run wrote (sha256 {file.sha256[:12]}..., "
            f"recorded {recorded['scales_sha256'][:12]}... in {file.path.parent / 'metrics.json'}); the file "
            f"was damaged or replaced. Re-run stage one (resume=true re-exports it) or give another scales file"
        )
