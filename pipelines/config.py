"""Typed configuration of the search-then-train pipeline (``conf/search_and_train.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from hypersearch.config import HSConfig
from repopt.config import Checked, LoggerConfig, register_schema, require
from repopt.errors import ConfigError
from repopt.family import get_family
from repopt.results import PER_TENSOR_TAG, quant_name
from target_train.config import TargetConfig
from target_train.step_config import ExportConfig, PruneConfig, QatConfig, validate_export, validate_qat

# What stage two trains in a pipeline job. ``searched`` is the method; the others are the
# baselines of the paper's comparison and its ablation (Table 4: where the constants come from, and
# each half of the method alone). The variants in SEARCHING need stage one.
VARIANTS = {
    "searched": "the RepOpt target with the scales stage one just searched",
    "plain": "the same plain target trained with plain SGD (no re-parameterization)",
    "init": "the RepOpt target with the un-searched HS init constants",
    "repvgg": "the structural re-parameterization baseline: RepVGG (family=ghostnet: RepGhostNet, model=rep)",
    "qarepvgg": "the quantization-friendly re-parameterization baseline: QARepVGG (model=qarepvgg: BN after the branch "
    "sum, none on the 1x1 and identity; vgg only)",
    "custom": "the RepOpt target with target.scales as given (a file, a run dir or official:X)",
    "ones": "the RepOpt target with every scale 1",
    "channel_mean": "the RepOpt target with the searched scales, each layer's replaced by their mean over channels",
    "official_mean": "the RepOpt target with the released scales of the member with the same layers (B1 for B1cpu), "
    "averaged per layer over channels and broadcast to the target's widths",
    "reinit_only": "re-initialized from the searched scales, trained with plain SGD (gradients not modified)",
    "masks_only": "gradients modified with the searched scales' masks, without the re-initialization",
}
SEARCHING = ("searched", "channel_mean", "reinit_only", "masks_only")


@dataclass
class PipelineConfig(Checked):
    family: str = "vgg"  # vgg | ghostnet: both stages' (hs.family and target.family follow it)
    # data=<name> chooses both stages' data set (conf/data/<name>.yaml, loaded as hs.data and as target.data;
    # data@hs.data=<name> one stage's). Only the choice counts: conf/search_and_train.yaml empties this key,
    # and a stage's data settings are hs.data.* and target.data.*
    data: Any = None
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # the job's run; hs.logger and target.logger follow it
    hs: HSConfig = field(default_factory=HSConfig)
    target: TargetConfig = field(default_factory=lambda: TargetConfig(scales=None))
    variant: str = "searched"  # one of VARIANTS: searched | plain | init | repvgg | qarepvgg | custom | ones | channel_mean | official_mean | reinit_only | masks_only
    resume: bool = False  # continue both stages from their last.pt; finished stages are skipped
    shared_search: bool = False  # true: stage one runs in <sweep>/searches/<its settings' hash>/, once for every job that has the same stage-one settings (job/hs links to it)
    export: bool = False  # third step: ONNX export + INT8 PTQ of the target (target_train.export)
    # its settings (quant.run is set by the job; quant.tag stays "": compare reads quant.json)
    quant: ExportConfig = field(default_factory=ExportConfig)
    ptq_per_tensor: bool = False  # with export=true: the export step once more with per-tensor weights (quant.* with per_channel=false, tag=per_tensor): target/quant-per_tensor.json beside quant.json
    # after export: quantization-aware training of the target (target_train.qat, needs torchao), writing target/qat.json;
    # it does not need export=true. The switch is "qat" and its settings "qat_train", as prune/pruning and export/quant
    qat: bool = False
    qat_train: QatConfig = field(default_factory=QatConfig)  # its settings (qat_train.run is set by the job)
    prune: bool = False  # last step: channel pruning + fine-tuning of the target (target_train.prune; vgg only)
    pruning: PruneConfig = field(default_factory=PruneConfig)  # its settings (pruning.run is set by the job)
    run_dir: Optional[str] = None  # the job directory; null: Hydra's output directory

    def check(self, prefix: str = "") -> None:
        require(self.variant in VARIANTS, prefix + "variant", self.variant, "one of " + ", ".join(VARIANTS))
        if self.data is not None:
            raise ConfigError(
                f"data={self.data} sets nothing: data=<name> only chooses both stages' data set; "
                f"a stage's data settings are hs.data.*=... and target.data.*=..."
            )
        for stage in ("hs", "target"):
            value = getattr(self, stage).family
            if value != self.family:
                raise ConfigError(
                    f"{stage}.family={value} differs from family={self.family}: the scales stage one "
                    f"searches fit only its own family; set family=... for both stages"
                )
        if self.variant == "qarepvgg" and "qarepvgg" not in get_family(self.family).baseline_modes:
            raise ConfigError(
                f"variant=qarepvgg trains QARepVGG, a vgg baseline; family={self.family} has no such "
                f"model (its baseline is variant=repvgg)"
            )
        if self.prune and self.family != "vgg":
            raise ConfigError(f"prune=true prunes VGG targets; family={self.family} has no pruning step (set prune=false)")
        if self.prune:
            self.pruning.check(prefix + "pruning.", need_run=False)
        if self.ptq_per_tensor and not self.export:
            raise ConfigError("ptq_per_tensor=true runs the export step a second time, per tensor; set export=true too")
        if self.ptq_per_tensor and not self.quant.per_channel:
            raise ConfigError(
                "ptq_per_tensor=true adds a per-tensor PTQ beside quant.json, but quant.per_channel=false "
                "makes quant.json per tensor already; set one of them"
            )
        if self.export and self.quant.tag:
            raise ConfigError(
                f"quant.tag={self.quant.tag}: the pipeline names its export files itself (quant.json, and "
                f"{quant_name(PER_TENSOR_TAG)} with ptq_per_tensor=true), which compare reads; leave quant.tag empty"
            )
        # the steps' own checks, before any training: a bad setting must not wait for two stages to fail
        for on, name, node, validate in (
            (self.export, "quant", self.quant, validate_export),
            (self.qat, "qat_train", self.qat_train, validate_qat),
        ):
            if on:
                try:
                    validate(replace(node, run="<job>/target"))
                except ConfigError as exc:
                    raise ConfigError(f"{prefix}{name}.{exc}") from None
        super().check(prefix)


register_schema("search_and_train_schema", PipelineConfig)
