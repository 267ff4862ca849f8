"""Architecture specs of the RepOpt-VGG family and the per-block layout derived from them.

Everything that depends only on the architecture (block names, channel counts, strides, which
blocks carry an identity branch, the expected scale keys and the HS init constants) is computed
here, so that the models, the scales-file validation and the grad masks agree by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

IMAGENET_STRIDES = (2, 2, 2, 2, 2)
SCALE_KINDS = ("scale_conv", "scale_1x1", "scale_identity")


@dataclass(frozen=True)
class BlockSpec:
    """One block position: ``name`` is its module path (``stage0``, ``stage2.3``)."""

    name: str
    stage: int
    index: int
    in_channels: int
    out_channels: int
    stride: int

    @property
    def has_identity(self) -> bool:
        """A block gets an identity branch when its input and output shapes agree."""
        return self.in_channels == self.out_channels and self.stride == 1

    @property
    def init_conv_scale(self) -> float:
        """HS init of s_conv and s_1x1: 1 for the first block of a stage, sqrt(2/i) after."""
        return 1.0 if self.index == 0 else math.sqrt(2.0 / self.index)

    def scale_keys(self) -> list[str]:
        kinds = SCALE_KINDS if self.has_identity else SCALE_KINDS[:2]
        return [f"{self.name}.{kind}.weight" for kind in kinds]


@dataclass(frozen=True)
class ArchSpec:
    """A member of the family: blocks per stage 1-4, width multipliers, the five stage strides."""

    name: str
    num_blocks: tuple[int, int, int, int]
    width_multiplier: tuple[float, float, float, float]
    strides: tuple[int, int, int, int, int] = IMAGENET_STRIDES
    family = "vgg"
    blocks: tuple[BlockSpec, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.num_blocks) != 4 or any(not float(n).is_integer() or n < 1 for n in self.num_blocks):
            raise ConfigError(f"arch {self.name}: num_blocks must be 4 positive integers, got {self.num_blocks}")
        if len(self.width_multiplier) != 4 or any(not math.isfinite(w) or w <= 0 for w in self.width_multiplier):
            raise ConfigError(f"arch {self.name}: width_multiplier must be 4 positive numbers, got {self.width_multiplier}")
        if len(self.strides) != 5 or any(s not in (1, 2) for s in self.strides):
            raise ConfigError(f"arch {self.name}: strides must be 5 values of 1 or 2, got {self.strides}")
        object.__setattr__(self, "num_blocks", tuple(int(n) for n in self.num_blocks))
        object.__setattr__(self, "width_multiplier", tuple(float(w) for w in self.width_multiplier))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        if min(self.stage_widths) < 1:
            raise ConfigError(
                f"arch {self.name}: width_multiplier {self.width_multiplier} gives stage widths "
                f"{self.stage_widths}; every stage needs at least one channel"
            )
        object.__setattr__(self, "blocks", tuple(self._layout()))

    @property
    def stage_widths(self) -> tuple[int, int, int, int, int]:
        w = self.width_multiplier
        return (min(64, int(64 * w[0])), int(64 * w[0]), int(128 * w[1]), int(256 * w[2]), int(512 * w[3]))

    @property
    def depth(self) -> int:
        """Conv layers of the plain (deployed) network: stage0 plus every block."""
        return len(self.blocks)

    @property
    def feature_dim(self) -> int:
        return self.stage_widths[-1]

    def _layout(self) -> list[BlockSpec]:
        widths = self.stage_widths
        layout = [BlockSpec("stage0", 0, 0, 3, widths[0], self.strides[0])]
        in_ch = widths[0]
        for stage in range(1, 5):
            for i in range(self.num_blocks[stage - 1]):
                stride = self.strides[stage] if i == 0 else 1
                layout.append(BlockSpec(f"stage{stage}.{i}", stage, i, in_ch, widths[stage], stride))
                in_ch = widths[stage]
        return layout

    def with_strides(self, strides) -> ArchSpec:
        return replace(self, strides=tuple(strides))

    def scale_shapes(self) -> dict[str, tuple[int]]:
        """The exact key set and shapes a scales file for this architecture must hold."""
        return {key: (b.out_channels,) for b in self.blocks for key in b.scale_keys()}

    def init_scales(self) -> dict[str, torch.Tensor]:
        """The HS init constants (the un-searched ``scales=init`` baseline)."""
        import torch  # here: the specs are read by the config check, before torch loads

        out = {}
        for b in self.blocks:
            for key in b.scale_keys():
                value = 1.0 if key.endswith("scale_identity.weight") else b.init_conv_scale
                out[key] = torch.full((b.out_channels,), value, dtype=torch.float32)
        return out

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "num_blocks": list(self.num_blocks),
            "width_multiplier": list(self.width_multiplier),
            "strides": list(self.strides),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ArchSpec:
        try:
            return cls(
                str(d["name"]), tuple(d["num_blocks"]), tuple(float(w) for w in d["width_multiplier"]), tuple(d["strides"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"not an architecture spec ({type(exc).__name__}: {exc}); expected name, num_blocks, width_multiplier, strides"
            ) from None


_REGISTRY: dict[str, ArchSpec] = {
    # The four official variants (RepOpt-VGG paper / official repository).
    "B1": ArchSpec("B1", (4, 6, 16, 1), (2, 2, 2, 4)),
    "B2": ArchSpec("B2", (4, 6, 16, 1), (2.5, 2.5, 2.5, 5)),
    "L1": ArchSpec("L1", (8, 14, 24, 1), (2, 2, 2, 4)),
    "L2": ArchSpec("L2", (8, 14, 24, 1), (2.5, 2.5, 2.5, 5)),
    # Small members of the same family for CPU runs and tests.
    "A0s": ArchSpec("A0s", (2, 4, 8, 1), (0.5, 0.5, 0.5, 1)),
    "small": ArchSpec("small", (2, 2, 2, 1), (0.25, 0.25, 0.25, 0.5)),
    "tiny": ArchSpec("tiny", (2, 2, 1, 1), (0.125, 0.125, 0.125, 0.125)),
    # B1's depth at a width a 2-core CPU trains on CIFAR in minutes, and two shallower members:
    # the depth ablation (conf/sweep/depth_cpu.yaml) of 28, 15 and 6 conv layers.
    "B1cpu": ArchSpec("B1cpu", (4, 6, 16, 1), (0.25, 0.25, 0.25, 0.5)),
    "B1cpu_mid": ArchSpec("B1cpu_mid", (2, 3, 8, 1), (0.25, 0.25, 0.25, 0.5)),
    "B1cpu_shallow": ArchSpec("B1cpu_shallow", (1, 1, 2, 1), (0.25, 0.25, 0.25, 0.5)),
}


def arch_names() -> list[str]:
    return list(_REGISTRY)


def get_arch(name: str | ArchSpec, strides=None, *, num_blocks=None, width_multiplier=None) -> ArchSpec:
    """Look up an architecture by name, optionally with other stage strides, depth or widths.

    A member whose depth or widths are overridden is another architecture: its name says so
    (``B1cpu[num_blocks=1-1-2-1]``), and checkpoints, scales files and results carry its full spec.
    """
    if isinstance(name, ArchSpec):
        spec = name
    else:
        try:
            spec = _REGISTRY[name]
        except KeyError:
            raise ConfigError(f"unknown architecture {name!r}; choose one of {', '.join(_REGISTRY)}") from None
    changed = {}
    if num_blocks is not None and tuple(num_blocks) != spec.num_blocks:
        changed["num_blocks"] = tuple(num_blocks)
    if width_multiplier is not None and tuple(float(w) for w in width_multiplier) != spec.width_multiplier:
        changed["width_multiplier"] = tuple(float(w) for w in width_multiplier)
    if changed:
        label = ",".join(f"{k}={'-'.join(f'{v:g}' for v in vals)}" for k, vals in changed.items())
        spec = ArchSpec(
            f"{spec.name}[{label}]",
            changed.get("num_blocks", spec.num_blocks),
            changed.get("width_multiplier", spec.width_multiplier),
            spec.strides,
        )
    return spec.with_strides(strides) if strides is not None else spec
