"""Model families: what the core needs to know about each (docs/design.md, "The model family").

A family is a set of architecture specs (each with ``name``, ``strides``, ``depth``,
``scale_shapes()``, ``init_scales()``, ``to_dict()``) and one model class that builds any of
them in any of the family's modes. The scales contract, the data, the trainer, the apps and
the pipeline only talk to this interface; stage two adds the re-initialization, the grad masks
and the deploy folding per family (``target_train/handler.py``).

To add a family: register its specs and model class here, and its three stage-two functions
in ``target_train/handler.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from . import arch as vgg_arch
from .blocks import CSLA_MODES  # every family: hs (all scales learn) and csla (only the identity scales learn)
from .errors import ConfigError
from .ghostnet import arch as ghost_arch


@dataclass(frozen=True)
class Family:
    """One model family: its specs, how to build a model, its modes and its released scales."""

    name: str
    summary: str
    arch_names: Callable[[], list[str]]
    lookup: Callable[..., Any]  # (name | spec, strides) -> spec
    from_dict: Callable[[dict], Any]
    build: Callable[..., nn.Module]  # (spec, num_classes, mode, fused_forward) -> model
    baseline_mode: str  # the structural re-parameterization baseline trained by stage two
    official: Mapping[str, str]  # released scales: official name -> packaged file
    default_arch: str

    @property
    def modes(self) -> tuple[str, ...]:
        return (*CSLA_MODES, "target", self.baseline_mode, "deploy")


def _build_vgg(spec, num_classes: int, mode: str, fused_forward: bool = False) -> nn.Module:
    from .vgg import RepOptVGG

    return RepOptVGG(spec, num_classes, mode=mode, fused_forward=fused_forward)


def _build_ghostnet(spec, num_classes: int, mode: str, fused_forward: bool = False) -> nn.Module:
    from .ghostnet.model import RepOptGhostNet

    return RepOptGhostNet(spec, num_classes, mode=mode, fused_forward=fused_forward)


FAMILIES: dict[str, Family] = {
    "vgg": Family(
        "vgg", "RepOpt-VGG: plain 3x3 conv -> BN -> ReLU stages (CSLA: 3x3 + 1x1 + identity)",
        vgg_arch.arch_names, vgg_arch.get_arch, vgg_arch.ArchSpec.from_dict, _build_vgg, "repvgg",
        {n: f"RepOpt-VGG-{n}-scales.pth" for n in ("B1", "B2", "L1", "L2")}, "B1"),
    "ghostnet": Family(
        "ghostnet", "RepOpt-GhostNet: RepGhost bottlenecks whose fusion branch lives in the optimizer",
        ghost_arch.ghost_arch_names, ghost_arch.get_ghost_arch, ghost_arch.GhostSpec.from_dict, _build_ghostnet, "rep",
        {"ghostnet_0_5x": "RepOptGhostNet_0_5x_scales.pth"}, "ghostnet_0_5x"),
}


def family_names() -> list[str]:
    return list(FAMILIES)


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}") from None


def family_of(spec_or_model) -> Family:
    """The family of an architecture spec, an arch name, or a model built by a family."""
    spec = getattr(spec_or_model, "arch", spec_or_model)
    if isinstance(spec, str):
        for fam in FAMILIES.values():
            if spec in fam.arch_names():
                return fam
        raise ConfigError(f"unknown architecture {spec!r}; choose one of {', '.join(all_arch_names())}")
    return get_family(getattr(spec, "family", "vgg"))


def all_arch_names() -> list[str]:
    return [n for fam in FAMILIES.values() for n in fam.arch_names()]


def get_spec(name, strides=None, **overrides):
    """Any family's architecture by name (or a spec passed through), with its overrides applied.

    ``overrides`` are VGG's ``num_blocks``/``width_multiplier``; other families choose their
    members by name and reject them.
    """
    fam = family_of(name)
    given = {k: v for k, v in overrides.items() if v is not None}
    if fam.name == "vgg":
        return vgg_arch.get_arch(name, strides, **given)
    if given:
        raise ConfigError(f"arch {getattr(name, 'name', name)}: {', '.join(sorted(given))} apply to the vgg family only; "
                          f"choose a {fam.name} member by name ({', '.join(fam.arch_names())})")
    return fam.lookup(name, strides)


def spec_from_dict(d: dict):
    """The spec recorded in a checkpoint, a scales file or a result (``family`` absent: vgg)."""
    if not isinstance(d, dict):
        raise ConfigError(f"not an architecture spec: {type(d).__name__}")
    return get_family(str(d.get("family", "vgg"))).from_dict(d)


def build_model(spec, num_classes: int, mode: str, fused_forward: bool = False) -> nn.Module:
    """A model of ``spec``'s family in ``mode`` (hs, csla, target, the baseline, deploy)."""
    spec = get_spec(spec)
    fam = family_of(spec)
    if mode not in fam.modes:
        raise ConfigError(f"mode {mode!r} is not a {fam.name} mode; choose one of {', '.join(fam.modes)}")
    return fam.build(spec, num_classes, mode, fused_forward)
