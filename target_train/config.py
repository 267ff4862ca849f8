"""Stage two's schema (``conf/target_train.yaml``): the shared training fields plus the target's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from repopt.config import SCALES_FROM, TrainConfig, register_schema, require
from repopt.errors import ConfigError
from repopt.family import FAMILIES, get_family

MODELS = ("target", *(m for f in FAMILIES.values() for m in f.baseline_modes))  # target, or one of a family's baselines
SCALES_TRANSFORMS = ("none", "channel_mean")


@dataclass
class TargetConfig(TrainConfig):
    """Stage two: target training."""

    # ``scales`` names a file by path, which may change (a moved sweep); what must not change is the file's
    # content, checked by sha256 against the checkpoint's record (``scales_identity``)
    SETTINGS_ALLOWED: ClassVar[tuple[str, ...]] = TrainConfig.SETTINGS_ALLOWED + ("scales",)

    model: str = "target"  # target (the RepOpt model) | repvgg (vgg baseline) | qarepvgg (vgg, QARepVGG) | rep (ghostnet baseline, RepGhostNet)
    # file | stage-one run dir | official (the arch's released file) | official:B1 | none | init | ones | official_mean[:B1]
    scales: Optional[str] = "official"
    scales_from: str = "model"  # an official HS checkpoint (latest.pth): the scales of its model | ema state dict
    scales_transform: str = "none"  # none | channel_mean: each layer's scales replaced by their mean over channels (ablation)
    reinit: bool = True  # re-initialize the target from the scales (false: the ablation "masks only")
    masks: bool = True  # modify the gradients with the scales' masks (false: the ablation "re-init only", plain optimizer)
    use_identity_scales: bool = True  # re-init with the searched s_id (false: identity weight 1)
    deploy: bool = True  # write deploy.pt (folded conv+ReLU, loads without this package)

    def check(self, prefix: str = "") -> None:
        super().check(prefix)
        require(self.model in MODELS, prefix + "model", self.model, "one of " + ", ".join(MODELS))
        require(self.scales_from in SCALES_FROM, prefix + "scales_from", self.scales_from, "one of " + ", ".join(SCALES_FROM))
        require(
            self.scales_transform in SCALES_TRANSFORMS,
            prefix + "scales_transform",
            self.scales_transform,
            "one of " + ", ".join(SCALES_TRANSFORMS),
        )
        family = get_family(self.family)
        if self.model not in ("target", *family.baseline_modes):
            others = "".join(f"{prefix}model={m}, " for m in family.baselines)
            raise ConfigError(
                f"{prefix}model={self.model} is not a {self.family} model; the {self.family} baseline is "
                f"{prefix}model={family.baseline_mode} (or {others}{prefix}model=target)"
            )


register_schema("target_train_schema", TargetConfig)
