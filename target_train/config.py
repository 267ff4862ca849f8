"""Stage two's schema (``conf/target_train.yaml``): the shared training fields plus the target's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from repopt.config import TrainConfig, register_schema, require

MODELS = ("target", "repvgg")


@dataclass
class TargetConfig(TrainConfig):
    """Stage two: target training."""

    RESUME_KEYS: ClassVar[tuple[str, ...]] = TrainConfig.RESUME_KEYS + ("model", "scales", "use_identity_scales")

    model: str = "target"  # target (RepOpt-VGG) | repvgg (structural re-param baseline)
    scales: Optional[str] = "official:B1"  # file | stage-one run dir | official:B1 | none | init
    use_identity_scales: bool = True  # re-init with the searched s_id (false: identity weight 1)
    deploy: bool = True  # write deploy.pt (folded conv+ReLU, loads without this package)

    def check(self, prefix: str = "") -> None:
        super().check(prefix)
        require(self.model in MODELS, prefix + "model", self.model, "one of " + ", ".join(MODELS))


register_schema("target_train_schema", TargetConfig)
