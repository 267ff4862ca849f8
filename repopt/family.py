"""The model families the project knows (docs/design.md, "The model family").

A family is a folder: ``repopt/<family>/`` holds its specs, blocks and model class and exports one
``FAMILY`` record (``repopt.family_record.Family``); stage two adds its re-initialization, grad masks and
deploy folding in ``target_train/families/<family>.py``. This module only registers the records
and answers "which family, which spec, which model". Adding a family: see the README.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError
from .family_record import Family
from .ghostnet import FAMILY as GHOSTNET
from .vgg import FAMILY as VGG

if TYPE_CHECKING:
    from torch import nn

FAMILIES: dict[str, Family] = {fam.name: fam for fam in (VGG, GHOSTNET)}


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

    ``overrides`` are those the family declares (VGG's ``num_blocks``/``width_multiplier``); other
    families choose their members by name and reject them.
    """
    fam = family_of(name)
    given = {k: v for k, v in overrides.items() if v is not None}
    foreign = sorted(set(given) - set(fam.overrides))
    if foreign:
        owners = [f.name for f in FAMILIES.values() if set(foreign) <= set(f.overrides)]
        raise ConfigError(
            f"arch {getattr(name, 'name', name)}: {', '.join(foreign)} apply to the {' and '.join(owners) or 'no'} "
            f"family only; choose a {fam.name} member by name ({', '.join(fam.arch_names())})"
        )
    return fam.lookup(name, strides, **given)


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
