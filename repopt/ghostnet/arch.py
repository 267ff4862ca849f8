"""Architecture specs of the RepOpt-GhostNet family and the per-bottleneck layout derived from them.

The layout is the official RepGhostNet table: groups of bottlenecks ``(kernel, expansion,
channels, se_ratio, stride)`` with channel counts scaled by ``width`` and rounded to a multiple of
4. Each bottleneck has two ghost modules (``ghost1``, ``ghost2``); each ghost module carries two
scales in Hyper-Search, under the official keys ``blocks.{g}.{i}.ghost{1,2}.fusion_scale.weight``
(the identity branch, init 1) and ``...ghost{1,2}.cheap_operation.1.weight`` (after the depthwise
"cheap operation", init sqrt(2 / (m + 1)) for module index m within a stage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

GHOST_SCALE_KINDS = ("fusion_scale", "cheap_operation.1")
HEAD_CHANNELS = 1280

# (kernel, expansion, channels, se_ratio, stride) per bottleneck, grouped as in the official table.
OFFICIAL_LAYOUT = (
    ((3, 8, 16, 0.0, 1),),
    ((3, 24, 24, 0.0, 2),),
    ((3, 36, 24, 0.0, 1),),
    ((5, 36, 40, 0.25, 2),),
    ((5, 60, 40, 0.25, 1),),
    ((3, 120, 80, 0.0, 2),),
    ((3, 100, 80, 0.0, 1), (3, 120, 80, 0.0, 1), (3, 120, 80, 0.0, 1), (3, 240, 112, 0.25, 1), (3, 336, 112, 0.25, 1)),
    ((5, 336, 160, 0.25, 2),),
    ((5, 480, 160, 0.0, 1), (5, 480, 160, 0.25, 1), (5, 480, 160, 0.0, 1), (5, 480, 160, 0.25, 1)),
)
# A short member for CPU tests: every kind of bottleneck (identity and conv shortcut, SE, 3x3 and
# 5x5 depthwise, a stage of three) and the same four downsampling positions.
TINY_LAYOUT = (
    ((3, 8, 16, 0.0, 1),),
    ((3, 24, 24, 0.0, 2),),
    ((5, 36, 40, 0.25, 2),),
    ((3, 60, 40, 0.25, 1), (3, 60, 40, 0.0, 1)),
    ((3, 120, 80, 0.0, 2),),
    ((5, 240, 112, 0.25, 2),),
)


def make_divisible(value: float, divisor: int = 4) -> int:
    """Round to the nearest multiple of ``divisor`` (at least ``divisor``), never more than 10 % down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclass(frozen=True)
class BottleneckSpec:
    """One bottleneck: ``name`` is its module path (``blocks.6.2``); ``stage_index`` counts the
    bottlenecks since the last change of shape (1 for the first), which sets the HS init."""

    name: str
    in_channels: int
    mid_channels: int
    out_channels: int
    kernel: int
    stride: int
    se_ratio: float
    stage_index: int

    @property
    def has_identity_shortcut(self) -> bool:
        return self.in_channels == self.out_channels and self.stride == 1

    def modules(self) -> list[tuple[str, int, int]]:
        """(ghost module path, its channels, its module index in the stage) for ghost1 and ghost2."""
        return [
            (f"{self.name}.ghost1", self.mid_channels, 2 * self.stage_index - 1),
            (f"{self.name}.ghost2", self.out_channels, 2 * self.stage_index),
        ]


def cheap_scale_init(module_index: int) -> float:
    """The official HS init of the scale after the cheap operation: sqrt(2 / (m + 1))."""
    return math.sqrt(2.0 / (module_index + 1))


@dataclass(frozen=True)
class GhostSpec:
    """A member of the family: width, the layout table, the five strides, classifier dropout.

    ``strides`` are the stem's and those of the layout's four downsampling bottlenecks, in order,
    so the CIFAR convention ``[1, 1, 2, 2, 2]`` means the same for both families.
    """

    name: str
    width: float
    layout: tuple = OFFICIAL_LAYOUT
    strides: tuple[int, int, int, int, int] = (2, 2, 2, 2, 2)
    dropout: float = 0.2
    family = "ghostnet"
    bottlenecks: tuple[BottleneckSpec, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.width) and self.width > 0):
            raise ConfigError(f"arch {self.name}: width must be a positive number, got {self.width}")
        if len(self.strides) != 5 or any(s not in (1, 2) for s in self.strides):
            raise ConfigError(f"arch {self.name}: strides must be 5 values of 1 or 2, got {self.strides}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"arch {self.name}: dropout must be in [0, 1), got {self.dropout}")
        layout = tuple(tuple(tuple(row) for row in group) for group in self.layout)
        if sum(row[4] == 2 for group in layout for row in group) != 4:
            raise ConfigError(f"arch {self.name}: the layout needs exactly four downsampling (stride 2) bottlenecks")
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "width", float(self.width))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        object.__setattr__(self, "bottlenecks", tuple(self._layout()))

    @property
    def stem_channels(self) -> int:
        return make_divisible(16 * self.width)

    @property
    def final_channels(self) -> int:
        """The 1x1 ConvBnAct after the last bottleneck: twice the last expansion."""
        return make_divisible(self.layout[-1][-1][1] * self.width * 2)

    @property
    def feature_dim(self) -> int:
        return HEAD_CHANNELS

    @property
    def depth(self) -> int:
        """Conv layers on the deployed main path: stem, per bottleneck two ghost modules of two
        convs (+ the strided depthwise conv), the final 1x1 and the head."""
        return 1 + sum(4 + (b.stride > 1) for b in self.bottlenecks) + 2

    def _layout(self) -> list[BottleneckSpec]:
        out, in_ch, count, down = [], self.stem_channels, 0, 1
        for g, group in enumerate(self.layout):
            for i, (kernel, expansion, channels, se_ratio, stride) in enumerate(group):
                if stride == 2:
                    stride, down = self.strides[down], down + 1
                out_ch, mid_ch = make_divisible(channels * self.width), make_divisible(expansion * self.width)
                count = count + 1 if stride == 1 and in_ch == out_ch else 1
                out.append(BottleneckSpec(f"blocks.{g}.{i}", in_ch, mid_ch, out_ch, kernel, stride, float(se_ratio), count))
                in_ch = out_ch
        return out

    def with_strides(self, strides) -> GhostSpec:
        return replace(self, strides=tuple(strides))

    def scale_shapes(self) -> dict[str, tuple[int]]:
        """The exact key set and shapes a scales file for this architecture must hold."""
        return {
            f"{path}.{kind}.weight": (channels,)
            for b in self.bottlenecks
            for path, channels, _ in b.modules()
            for kind in GHOST_SCALE_KINDS
        }

    def init_scales(self) -> dict[str, torch.Tensor]:
        """The HS init constants: fusion scale 1, cheap-operation scale sqrt(2 / (m + 1))."""
        import torch  # here: the specs are read by the config check, before torch loads

        out = {}
        for b in self.bottlenecks:
            for path, channels, index in b.modules():
                out[f"{path}.fusion_scale.weight"] = torch.ones(channels)
                out[f"{path}.cheap_operation.1.weight"] = torch.full((channels,), cheap_scale_init(index))
        return out

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "name": self.name,
            "width": self.width,
            "layout": [[list(row) for row in group] for group in self.layout],
            "strides": list(self.strides),
            "dropout": self.dropout,
        }

    @classmethod
    def from_dict(cls, d: dict) -> GhostSpec:
        try:
            return cls(
                str(d["name"]),
                float(d["width"]),
                tuple(tuple(tuple(r) for r in g) for g in d["layout"]),
                tuple(d["strides"]),
                float(d.get("dropout", 0.2)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"not a ghostnet architecture spec ({type(exc).__name__}: {exc}); expected name, width, layout, strides"
            ) from None


_REGISTRY: dict[str, GhostSpec] = {
    # The official widths (the released scales are for 0.5x, searched on CIFAR-100).
    "ghostnet_0_5x": GhostSpec("ghostnet_0_5x", 0.5),
    "ghostnet_1_0x": GhostSpec("ghostnet_1_0x", 1.0),
    "ghostnet_1_5x": GhostSpec("ghostnet_1_5x", 1.5),
    # Small members for CPU runs and tests.
    "ghostnet_0_25x": GhostSpec("ghostnet_0_25x", 0.25),
    "ghostnet_tiny": GhostSpec("ghostnet_tiny", 0.25, TINY_LAYOUT),
}


def ghost_arch_names() -> list[str]:
    return list(_REGISTRY)


def get_ghost_arch(name: str | GhostSpec, strides=None) -> GhostSpec:
    spec = name if isinstance(name, GhostSpec) else _REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"unknown ghostnet architecture {name!r}; choose one of {', '.join(_REGISTRY)}")
    return spec.with_strides(strides) if strides is not None else spec
