"""Typed configuration: the schema behind the YAML files in ``conf/``.

Apps merge Hydra's composed config onto these dataclasses (``to_typed``), so a misspelt key or a
value of the wrong type is a clear error before anything runs, and code reads attributes, not
string keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError


@dataclass
class ArchConfig:
    name: str = "B1"
    strides: Optional[list[int]] = None  # five stage strides; null = ImageNet strides (2,2,2,2,2)


@dataclass
class DataConfig:
    name: str = "cifar100"  # cifar100 | cifar10 | imagefolder | fashionmnist | synthetic
    root: str = "~/.cache/repopt/data"  # where the data set lives (or is downloaded to)
    download: bool = True  # torchvision download when the files are absent (needs network)
    verify_checksums: bool = True  # check torchvision's md5 of the CIFAR/FashionMNIST files
    image_size: int = 32  # training / evaluation resolution
    batch_size: int = 256  # global batch size
    eval_batch_size: int = 512
    loader: str = "auto"  # auto | device | dataloader: device keeps uint8 tensors and augments on the device
    num_workers: int = 4  # DataLoader workers (dataloader path)
    crop_padding: int = 4  # random crop with this zero padding (small-image sets)
    hflip: bool = True
    random_resized_crop: bool = False  # ImageNet-style training crop (dataloader path)
    train_subset: Optional[int] = None  # use only the first N training images (quick runs)
    test_subset: Optional[int] = None
    cache_dir: Optional[str] = None  # decoded-tensor cache for image folders; null = <root>/.repopt-cache
    synthetic_num_classes: int = 10
    synthetic_train_size: int = 512
    synthetic_test_size: int = 256
    drop_last: bool = True  # static shapes for compile / CUDA graphs


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1  # at base_batch_size; scaled linearly by batch_size / base_batch_size
    base_batch_size: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 4e-5  # official groups: conv/linear weights and identity scales only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    foreach: Optional[bool] = None  # null: torch's default
    fused: Optional[bool] = None  # SGD only; null: fused kernel where torch has one
    compile_step: bool = False  # stage two, RepOptSGD: torch.compile mask+decay+momentum+step into one pass


@dataclass
class SchedConfig:
    name: str = "warmup_cosine"  # warmup_cosine | constant
    warmup_epochs: float = 5.0
    warmup_start_factor: float = 0.0  # lr at step 0 = factor * lr (linear warm-up)
    min_lr: float = 0.0  # cosine floor


@dataclass
class TrainConfig:
    """Fields every training app shares (stage one and stage two)."""

    arch: ArchConfig = field(default_factory=ArchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    epochs: int = 240
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    compile: str = "false"  # torch.compile the training model: true | false | auto (on CUDA only)
    compile_mode: Optional[str] = "auto"  # auto (CUDA graphs on one GPU with drop_last) | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    channels_last: str = "auto"  # auto (on CUDA) | true | false
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None  # max grad norm; breaks RepOpt equivalence, off by default
    resume: bool = False  # continue from last.pt in the run directory
    progress: str = "auto"  # auto (bar on a TTY) | bar | log | off
    deterministic: bool = False  # torch.use_deterministic_algorithms
    max_steps_per_epoch: Optional[int] = None  # cap steps per epoch (smoke tests, benchmarks)
    run_dir: Optional[str] = None  # null: Hydra's output directory


@dataclass
class HSConfig(TrainConfig):
    """Stage one: Hyper-Search."""

    mode: str = "hs"  # hs (all scales learn) | csla (only identity scales learn)
    scale_init: str = "paper"  # paper: sqrt(2/i) per block index | constant: every scale 1
    fused_forward: bool = True  # one 3x3 conv per block with the summed kernel (same function, faster)


@dataclass
class TargetConfig(TrainConfig):
    """Stage two: target training."""

    model: str = "target"  # target (RepOpt-VGG) | repvgg (structural re-param baseline)
    scales: Optional[str] = "official:B1"  # file | stage-one run dir | official:B1 | none | init
    use_identity_scales: bool = True  # re-init with the searched s_id (false: identity weight 1)
    deploy: bool = True  # write deploy.pt (folded conv+ReLU, loads without this package)


T = TypeVar("T")


def to_typed(cfg: DictConfig | dict, schema: type[T]) -> T:
    """Validate ``cfg`` against a dataclass schema and return the typed object."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid configuration: {exc}".replace("\n", " | ")) from None


def to_plain(cfg: Any) -> dict:
    """A JSON-able dict of a typed or OmegaConf config (for metadata and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def register_schema(name: str, node: type) -> None:
    """Make a dataclass the base of a root config (``defaults: [<name>, ...]``).

    Every schema key is then overridable from the command line without ``+`` and type-checked
    by Hydra itself.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=node)


register_schema("hypersearch_schema", HSConfig)
register_schema("target_train_schema", TargetConfig)
