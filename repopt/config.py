"""Typed configuration shared by both stages: the schema behind the groups in ``conf/``.

Apps merge Hydra's composed config onto these dataclasses (``to_typed``), so a misspelt key, a
value of the wrong type or an out-of-range number is one clear error naming the key before
anything runs, and code reads attributes, not string keys. Each stage owns its own schema
(``hypersearch.config.HSConfig``, ``target_train.config.TargetConfig``); this module holds
what they share.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import (
    cli_help,  # noqa: F401  (registers ${repopt_help:<app>}, the --help page of every root config)
    rundir,
)
from .errors import ConfigError
from .family import family_names, family_of, get_family, get_spec

# The values of the string settings, checked with the config before anything runs (the code that
# uses each one raises the same error should it ever be reached with another value).
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("warmup_cosine", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")
PROGRESS_MODES = ("auto", "bar", "log", "off")
# The state dict of an official HS checkpoint the scales are read from: ``model`` (what the official
# extraction loads) or ``ema`` (the moving average its search keeps beside it); read by repopt/scales.py.
SCALES_FROM = ("model", "ema")
RANDAUGMENT_MAX_MAGNITUDE = 30  # torchvision's RandAugment with its default 31 magnitude bins


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise the one-line error for a setting outside its range: ``optim.lr=-1: must be > 0``."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: must be {rule}; set it on the command line ({key}=...) or in the config")


class Checked:
    """A config node that validates its values. ``check(prefix)`` names keys as the user types them."""

    def check(self, prefix: str = "") -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Checked):
                value.check(f"{prefix}{f.name}.")


@dataclass
class ArchConfig(Checked):
    name: str = "B1"  # a member of a family (repopt/vgg/arch.py, repopt/ghostnet/arch.py); the fields below override its parts
    strides: Optional[list[int]] = None  # five strides (stem, then each downsampling stage); null = ImageNet (2,2,2,2,2)
    num_blocks: Optional[list[int]] = None  # vgg: blocks in stages 1-4; null = the named member's
    width_multiplier: Optional[list[float]] = None  # vgg: width multipliers of stages 1-4; null = the named member's

    def spec(self):
        """The architecture this config names, with its overrides (invalid values are a ConfigError)."""
        return get_spec(self.name, self.strides, num_blocks=self.num_blocks, width_multiplier=self.width_multiplier)

    def check(self, prefix: str = "") -> None:
        try:
            self.spec()
        except ConfigError as exc:
            stage = prefix.removesuffix("arch.")  # "" in a stage app, "hs." / "target." in the pipeline
            raise ConfigError(f"{stage}{exc}") from None  # "arch B1[...]: ...", in the pipeline "hs.arch B1[...]: ..."


@dataclass
class DataConfig(Checked):
    name: str = "cifar100"  # cifar100 | cifar10 | imagefolder | fashionmnist | synthetic
    root: str = "~/.cache/repopt/data"  # where the data set lives (or is downloaded to)
    download: bool = True  # torchvision download when the files are absent (needs network)
    verify_checksums: bool = True  # check torchvision's md5 of the CIFAR/FashionMNIST files
    image_size: int = 32  # training / evaluation resolution
    batch_size: int = 256  # global batch size
    eval_batch_size: int = 512  # evaluation batch (no gradients: larger than training fits)
    loader: str = "auto"  # auto | device | dataloader: device keeps uint8 tensors and augments on the device
    num_workers: int = 4  # DataLoader workers (dataloader path)
    crop_padding: int = 4  # random crop with this zero padding (small-image sets)
    hflip: bool = True  # random horizontal flip of training images
    random_resized_crop: bool = False  # ImageNet-style training crop (dataloader path)
    train_subset: Optional[int] = None  # use only the first N training images (quick runs)
    test_subset: Optional[int] = None  # evaluate on the first N test images only
    # decoded-tensor cache for image folders; null = $REPOPT_CACHE_DIR, else $XDG_CACHE_HOME/repopt/decoded, else
    # ~/.cache/repopt/decoded: a user cache, never the data root (it may be read-only or shared)
    cache_dir: Optional[str] = None
    synthetic_num_classes: int = 10  # data=synthetic: classes of the generated set
    synthetic_train_size: int = 512  # data=synthetic: training images
    synthetic_test_size: int = 256  # data=synthetic: test images
    drop_last: bool = True  # static shapes for compile / CUDA graphs
    # torchvision RandAugment at this magnitude (0-30); null = off. Per sample: worker DataLoader only
    randaugment_magnitude: Optional[int] = None
    randaugment_num_ops: int = 2  # RandAugment ops applied in sequence to each training image
    # per-channel normalization (0..1 scale); null = the source's (published / measured / ImageNet)
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None  # per-channel std (0..1 scale), given with mean
    # image folders: eval resizes to image_size / this, then centre-crops; null = 0.875 above 64 px, 1 below
    eval_crop_fraction: Optional[float] = None

    def check(self, prefix: str = "") -> None:
        for key in ("image_size", "batch_size", "eval_batch_size", "synthetic_train_size", "synthetic_test_size"):
            require(getattr(self, key) >= 1, prefix + key, getattr(self, key), ">= 1")
        require(self.synthetic_num_classes >= 2, prefix + "synthetic_num_classes", self.synthetic_num_classes, ">= 2")
        require(self.num_workers >= 0, prefix + "num_workers", self.num_workers, ">= 0")
        require(self.crop_padding >= 0, prefix + "crop_padding", self.crop_padding, ">= 0")
        for key in ("train_subset", "test_subset"):
            value = getattr(self, key)
            require(value is None or value >= 1, prefix + key, value, ">= 1 or null (all images)")
        m = self.randaugment_magnitude
        require(
            m is None or 0 <= m <= RANDAUGMENT_MAX_MAGNITUDE,
            prefix + "randaugment_magnitude",
            m,
            f"in [0, {RANDAUGMENT_MAX_MAGNITUDE}] or null (off)",
        )
        require(self.randaugment_num_ops >= 1, prefix + "randaugment_num_ops", self.randaugment_num_ops, ">= 1")
        for key in ("mean", "std"):
            value = getattr(self, key)
            require(value is None or len(value) == 3, prefix + key, value, "three numbers (R, G, B) or null")
        require(self.std is None or all(s > 0 for s in self.std), prefix + "std", self.std, "> 0 in every channel")
        require(
            (self.mean is None) == (self.std is None),
            prefix + "mean",
            self.mean,
            "given together with data.std (both or neither)",
        )
        f = self.eval_crop_fraction
        require(f is None or 0 < f <= 1, prefix + "eval_crop_fraction", f, "in (0, 1] or null")


@dataclass
class OptimConfig(Checked):
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1  # at base_batch_size; scaled linearly by batch_size / base_batch_size
    base_batch_size: int = 256  # the batch size lr is given for
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd: Nesterov momentum
    weight_decay: float = 4e-5  # official groups: conv/linear weights and identity scales only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw: moment decay rates
    eps: float = 1e-8  # adamw: added to the second moment's root
    foreach: Optional[bool] = None  # null: torch's default
    fused: Optional[bool] = None  # SGD only; null: fused kernel where torch has one
    # stage two, RepOptSGD: mask+decay+momentum+step in one torch.compile-d pass. null (auto): compiled
    # where available (a working torch.compile/inductor, cpu/cuda, float dtypes) for models of >= 1 M
    # parameters, else the eager step, with one logged warning when the compiler is what is missing
    # or fails; true: require it (error when unavailable); false: never. RepOptAdamW has no compiled step.
    compile_step: Optional[bool] = None

    def check(self, prefix: str = "") -> None:
        require(self.name in OPTIMIZERS, prefix + "name", self.name, "one of " + ", ".join(OPTIMIZERS))
        require(self.lr > 0, prefix + "lr", self.lr, "> 0")
        require(self.base_batch_size >= 1, prefix + "base_batch_size", self.base_batch_size, ">= 1")
        require(0 <= self.momentum < 1, prefix + "momentum", self.momentum, "in [0, 1)")
        require(self.weight_decay >= 0, prefix + "weight_decay", self.weight_decay, ">= 0")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), prefix + "betas", self.betas, "two numbers in [0, 1)"
        )
        require(self.eps > 0, prefix + "eps", self.eps, "> 0")


@dataclass
class SchedConfig(Checked):
    name: str = "warmup_cosine"  # warmup_cosine | constant
    warmup_epochs: float = 5.0  # linear warm-up length (fractions allowed; stepped every iteration)
    warmup_start_factor: float = 0.0  # lr at step 0 = factor * lr (linear warm-up)
    min_lr: float = 0.0  # cosine floor

    def check(self, prefix: str = "") -> None:
        require(self.name in SCHEDULES, prefix + "name", self.name, "one of " + ", ".join(SCHEDULES))
        require(self.warmup_epochs >= 0, prefix + "warmup_epochs", self.warmup_epochs, ">= 0")
        require(0 <= self.warmup_start_factor <= 1, prefix + "warmup_start_factor", self.warmup_start_factor, "in [0, 1]")
        require(self.min_lr >= 0, prefix + "min_lr", self.min_lr, ">= 0")


LOGGERS = ("none", "tensorboard", "mlflow")


@dataclass
class LoggerConfig(Checked):
    """Experiment tracking (``conf/logger/``; the trackers: repopt/tracking.py)."""

    name: str = "none"  # none | tensorboard (<run_dir>/tb/) | mlflow
    tracking_uri: Optional[str] = None  # mlflow: null = sqlite:///<outputs>/mlflow.db (the outputs/ folder holding the run)
    experiment: str = "repopt"  # mlflow experiment name (created when missing)
    artifact_location: Optional[str] = None  # mlflow, for a new experiment: null = <folder of the SQLite file>/mlartifacts
    artifacts: bool = True  # mlflow: upload metrics.json, history.csv, scales.safetensors / deploy.pt
    scales: bool = True  # stage one: per-stage |scale| histograms and means at each epoch

    def check(self, prefix: str = "") -> None:
        require(self.name in LOGGERS, prefix + "name", self.name, "one of " + ", ".join(LOGGERS))
        require(bool(self.experiment.strip()), prefix + "experiment", self.experiment, "a non-empty name")
        require(
            self.tracking_uri is None or bool(self.tracking_uri.strip()),
            prefix + "tracking_uri",
            self.tracking_uri,
            "a URI or null (sqlite:///<outputs>/mlflow.db)",
        )


@dataclass
class EMAConfig(Checked):
    """An exponential moving average of the weights (and BN statistics), kept beside the model."""

    enabled: bool = False  # keep an EMA of the weights
    decay: float = 0.9999  # ema = decay * ema + (1 - decay) * weights, at every update
    every: int = 1  # update after every N-th optimizer step
    evaluate: bool = True  # evaluate the EMA each epoch and deliver it: best.pt and deploy.pt hold its weights

    def check(self, prefix: str = "") -> None:
        require(0 < self.decay < 1, prefix + "decay", self.decay, "in (0, 1)")
        require(self.every >= 1, prefix + "every", self.every, ">= 1")


@dataclass
class MixConfig(Checked):
    """Mixup / CutMix of the training batches (torchvision's v2 MixUp and CutMix); off with both alphas 0."""

    mixup_alpha: float = 0.0  # Beta(alpha, alpha) of the mixup weight; 0 = no mixup
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) of the CutMix area; 0 = no CutMix
    prob: float = 1.0  # chance that a batch is mixed at all
    switch_prob: float = 0.5  # with both on: chance that a mixed batch gets CutMix instead of mixup

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def check(self, prefix: str = "") -> None:
        for key in ("mixup_alpha", "cutmix_alpha"):
            require(getattr(self, key) >= 0, prefix + key, getattr(self, key), ">= 0 (0 = off)")
        for key in ("prob", "switch_prob"):
            require(0 <= getattr(self, key) <= 1, prefix + key, getattr(self, key), "in [0, 1]")


@dataclass
class TrainConfig(Checked):
    """Fields every training app shares (stage one and stage two)."""

    # Keys a resumed (or skipped) run may change: every other setting must equal the one that started
    # the run (repopt/rundir.py, default deny). A stage schema may add its own.
    SETTINGS_ALLOWED: ClassVar[tuple[str, ...]] = rundir.SETTINGS_ALLOWED

    family: str = "vgg"  # vgg | ghostnet (repopt/family.py); arch must be one of its members
    arch: ArchConfig = field(default_factory=ArchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # experiment tracking: none | tensorboard | mlflow
    epochs: int = 240  # training epochs (the paper: 240 for both stages on CIFAR-100)
    seed: int = 0  # model init, data order and augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    compile: Optional[bool] = False  # torch.compile the training model; null = auto (on CUDA only)
    # auto (CUDA graphs on one GPU with drop_last) | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    compile_mode: Optional[str] = "auto"
    channels_last: Optional[bool] = None  # channels_last memory format; null = auto (on CUDA)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    grad_clip: Optional[float] = None  # max grad norm; breaks RepOpt equivalence, off by default
    resume: bool = False  # continue from last.pt in the run directory
    progress: str = "auto"  # auto (a bar on a terminal, log lines otherwise) | bar | log | off
    progress_every_s: float = 30.0  # progress=log: one line (step, loss, images/s, ETA) every this many seconds
    deterministic: bool = False  # torch.use_deterministic_algorithms
    max_steps_per_epoch: Optional[int] = None  # cap steps per epoch (smoke tests, benchmarks)
    run_dir: Optional[str] = None  # null: Hydra's output directory

    def __post_init__(self) -> None:
        if self.progress in ("False", "false"):  # YAML reads a bare `off` (progress: off) as false
            self.progress = "off"

    def check(self, prefix: str = "") -> None:
        require(self.family in family_names(), prefix + "family", self.family, "one of " + ", ".join(family_names()))
        super().check(prefix)
        arch_family = family_of(self.arch.spec()).name
        if arch_family != self.family:
            members = ", ".join(get_family(self.family).arch_names())
            raise ConfigError(
                f"{prefix}arch={self.arch.name} is a {arch_family} architecture but {prefix}family={self.family}; "
                f"choose one of its members ({members}) or {prefix}family={arch_family}"
            )
        require(self.epochs >= 1, prefix + "epochs", self.epochs, ">= 1")
        require(self.amp in AMP_MODES, prefix + "amp", self.amp, "one of " + ", ".join(AMP_MODES))
        require(self.progress in PROGRESS_MODES, prefix + "progress", self.progress, "one of " + ", ".join(PROGRESS_MODES))
        require(self.progress_every_s > 0, prefix + "progress_every_s", self.progress_every_s, "> 0 (seconds)")
        require(
            self.sched.warmup_epochs <= self.epochs,
            prefix + "sched.warmup_epochs",
            self.sched.warmup_epochs,
            f"<= epochs ({self.epochs}): the warm-up must end within the run",
        )
        require(0 <= self.label_smoothing < 1, prefix + "label_smoothing", self.label_smoothing, "in [0, 1)")
        require(self.grad_clip is None or self.grad_clip > 0, prefix + "grad_clip", self.grad_clip, "> 0 or null (off)")
        require(
            self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
            prefix + "max_steps_per_epoch",
            self.max_steps_per_epoch,
            ">= 1 or null (whole epochs)",
        )


T = TypeVar("T")


def to_typed(cfg: DictConfig | dict, schema: type[T]) -> T:
    """Validate ``cfg`` against a dataclass schema (types, then ranges) and return the typed object."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        typed = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid configuration: {exc}".replace("\n", " | ")) from None
    if isinstance(typed, Checked):
        typed.check()
    return typed  # type: ignore[return-value]


def to_plain(cfg: Any) -> dict:
    """A JSON-able dict of a typed or OmegaConf config (for metadata and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def register_schema(name: str, node: type) -> None:
    """Make a dataclass the base of a root config (``defaults: [<name>, ...]``).

    Every schema key is then overridable from the command line without ``+`` and type-checked
    by Hydra itself.
    """
    assert is_dataclass(node)
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=node)
