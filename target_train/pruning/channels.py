"""Structured channel pruning of a plain VGG with Torch-Pruning (docs/design.md, "Pruning").

Torch-Pruning traces the model into a dependency graph, so removing a conv's output channels
also removes them from its BN and from the next conv's (or the classifier's) input channels.
``prune_vgg`` prunes in place and returns a ``ChannelPlan``: which output channels of each block
survived, in the original indexing. The plan is what the rest of the pruning step works from: it
slices the grad masks and scales (``masks.py``), prunes a CSLA twin the same way (``csla.py``)
and is written to ``prune.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from repopt.errors import ConfigError
from repopt.family import family_of
from repopt.modules import unwrap
from repopt.vgg import RepOptVGG

from ..step_config import IMPORTANCES

PRUNABLE_MODES = ("target", "deploy", "repvgg", "qarepvgg")


@dataclass(frozen=True)
class ChannelPlan:
    """Kept output channels of every block, in network order and original (unpruned) indices.

    A block's input channels are the previous block's kept outputs (``stage0`` keeps the image's);
    the classifier's inputs are the last block's.
    """

    widths: Mapping[str, int]  # block name -> its output width before pruning
    kept: Mapping[str, tuple[int, ...]]  # block name -> the surviving output channels, ascending
    in_channels: int = 3

    @property
    def names(self) -> list[str]:
        return list(self.kept)

    def kept_in(self, name: str) -> tuple[int, ...]:
        names = self.names
        at = names.index(name)
        return tuple(range(self.in_channels)) if at == 0 else self.kept[names[at - 1]]

    def kept_features(self) -> tuple[int, ...]:
        """The classifier's surviving input features."""
        return self.kept[self.names[-1]]

    def index(self, name: str, which: str = "out") -> torch.Tensor:
        return torch.tensor(self.kept[name] if which == "out" else self.kept_in(name), dtype=torch.long)

    def to_dict(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "blocks": [
                {"name": n, "width": int(self.widths[n]), "kept_width": len(k), "kept": list(k)} for n, k in self.kept.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ChannelPlan":
        blocks = data["blocks"]
        return cls(
            {b["name"]: int(b["width"]) for b in blocks},
            {b["name"]: tuple(int(i) for i in b["kept"]) for b in blocks},
            int(data.get("in_channels", 3)),
        )


def block_convs(model: RepOptVGG) -> dict[int, str]:
    """id(conv) -> block name, for every conv of every block (a RepVGG block has two)."""
    convs = {}
    for spec, block in model.blocks():
        for module in block.modules():
            if isinstance(module, nn.Conv2d):
                convs[id(module)] = spec.name
    return convs


def _importance(name: str, model: nn.Module):
    import torch_pruning as tp

    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn_scale":
        if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            raise ConfigError(
                "importance=bn_scale ranks channels by their BN scale, but this model has no BN "
                "(the deployed form folds it away); use importance=l2"
            )
        return tp.importance.BNScaleImportance()
    raise ConfigError(f"importance={name!r}: choose one of {', '.join(IMPORTANCES)}")


def require_torch_pruning():
    try:
        import torch_pruning
    except ImportError:  # pragma: no cover - the [dev] and [prune] extras install it
        raise ConfigError("pruning needs Torch-Pruning: pip install 'repopt-pipeline[prune]' (or torch-pruning)") from None
    return torch_pruning


def check_prunable(model: nn.Module) -> RepOptVGG:
    model = unwrap(model)
    if not isinstance(model, RepOptVGG):  # the VGG family's model class
        family = family_of(model.arch).name if hasattr(model, "arch") else type(model).__name__
        raise ConfigError(
            f"channel pruning supports the VGG family (RepOpt-VGG, RepVGG, QARepVGG), not a {family} "
            f"model: a GhostNet's depthwise and ghost channels need their own coupling rules"
        )
    if model.mode not in PRUNABLE_MODES:
        raise ConfigError(
            f"cannot prune a {model.mode!r} model; prune the trained target, its deployed form or a (QA)RepVGG "
            f"({', '.join(PRUNABLE_MODES)})"
        )
    return model


def prune_vgg(
    model: nn.Module, ratio: float, importance: str = "l2", round_to: int | None = 8, image_size: int = 32
) -> ChannelPlan:
    """Remove ``ratio`` of every block's output channels (the least important, kept widths rounded
    down to a multiple of ``round_to``) in place; the classifier and the image input are kept.

    A layer whose rounded width would be 0 keeps all its channels (Torch-Pruning's rule). In a
    RepVGG with branches, the identity branches tie a block's inputs to its outputs, so the graph
    prunes such chains together, with one importance per group.
    """
    tp = require_torch_pruning()
    model = check_prunable(model)
    if not 0 <= ratio < 1:
        raise ConfigError(f"ratio={ratio}: must be in [0, 1) (the fraction of each layer's channels to remove)")
    if round_to is not None and round_to < 1:
        raise ConfigError(f"round_to={round_to}: must be a positive number of channels or null")
    ref = next(model.parameters())
    example = torch.randn(1, 3, image_size, image_size, device=ref.device, dtype=ref.dtype)
    widths = {spec.name: spec.out_channels for spec in model.arch.blocks}
    removed: dict[str, set[int]] = {name: set() for name in widths}
    owner = block_convs(model)
    was_training = model.training
    model.eval()
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=_importance(importance, model),
        pruning_ratio=ratio,
        ignored_layers=[model.linear],
        round_to=round_to,
    )
    for group in pruner.step(interactive=True):
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.Conv2d) and id(module) in owner and item.dep.handler == tp.prune_conv_out_channels:
                removed[owner[id(module)]].update(int(getattr(i, "idx", i)) for i in item.idxs)
        group.prune()
    model.train(was_training)
    model.zero_grad(set_to_none=True)  # the graph's tracing pass leaves no gradients behind
    plan = ChannelPlan(widths, {n: tuple(c for c in range(widths[n]) if c not in removed[n]) for n in widths})
    for spec, block in model.blocks():  # the plan must describe the pruned model exactly
        for module in block.modules():
            if isinstance(module, nn.Conv2d) and module.out_channels != len(plan.kept[spec.name]):
                raise RuntimeError(
                    f"{spec.name}: pruned conv has {module.out_channels} channels, the plan {len(plan.kept[spec.name])}"
                )
    return plan
