"""The official ImageNet target recipe (``experiment=target_imagenet``) and RandAugment: the composed
values, the transforms they build, exact replay, the device-loader refusal, and one real 224 px step."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module
from torchvision.transforms import v2

from repopt.config import DataConfig, to_typed
from repopt.data import build_data
from repopt.data.stats import IMAGENET_STATS
from repopt.errors import ConfigError
from repopt.scales import resolve_scales_path
from target_train.app import main as target_main
from target_train.config import TargetConfig
from tests.helpers.fake_datasets import write_fake_imagefolder
from tests.helpers.runs import read_json, run_hydra

CPU = torch.device("cpu")


def _recipe(*overrides: str) -> TargetConfig:
    with initialize_config_module("repopt.conf", version_base="1.3"):
        cfg = compose("target_train", overrides=["experiment=target_imagenet", "data.root=/data/imagenet", *overrides])
    return to_typed(cfg, TargetConfig)


def test_the_recipe_is_the_official_one():
    cfg = _recipe()
    assert (cfg.arch.name, cfg.arch.spec().strides, cfg.scales, cfg.model) == ("B1", (2, 2, 2, 2, 2), "official", "target")
    assert resolve_scales_path(cfg.scales, cfg.arch.spec()).name == "RepOpt-VGG-B1-scales.pth"
    ghost = _recipe("family=ghostnet")
    assert (ghost.arch.name, ghost.epochs, ghost.data.randaugment_magnitude) == ("ghostnet_0_5x", 120, 15)
    assert resolve_scales_path(ghost.scales, ghost.arch.spec()).name == "RepOptGhostNet_0_5x_scales.pth"
    assert (cfg.epochs, cfg.label_smoothing) == (120, 0.1)
    o = cfg.optim
    assert (o.name, o.lr, o.base_batch_size, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.1, 256, 0.9, True, 4e-5)
    assert o.lr * cfg.data.batch_size / o.base_batch_size == 0.1  # 8 GPUs x 32 in the official run
    s = cfg.sched
    assert (s.name, s.warmup_epochs, s.warmup_start_factor, s.min_lr) == ("warmup_cosine", 5, 0.0, 0.0)
    d = cfg.data
    assert (d.name, d.root, d.image_size, d.batch_size, d.loader) == ("imagefolder", "/data/imagenet", 224, 256, "dataloader")
    assert d.random_resized_crop and d.hflip and (d.randaugment_magnitude, d.randaugment_num_ops) == (15, 2)
    assert (tuple(d.mean), tuple(d.std)) == IMAGENET_STATS and d.eval_crop_fraction == 1.0
    assert not cfg.ema.enabled and (cfg.ema.decay, cfg.ema.every) == (0.9999, 1)
    assert not cfg.mix.enabled and (cfg.mix.prob, cfg.mix.switch_prob) == (1.0, 0.5)


def test_the_recipe_builds_the_official_transforms(tmp_path):
    """Train: RandomResizedCrop(224) + flip + RandAugment(2 ops, magnitude 15); eval: Resize(224) + CenterCrop(224)."""
    write_fake_imagefolder(tmp_path, ["a", "b"], 2, (40, 30), split_names=("train", "val"))
    cfg = _recipe(f"data.root={tmp_path}", "data.batch_size=2", "data.num_workers=0").data
    bundle = build_data(cfg, CPU)
    train = bundle.train.loader.dataset.transform.transforms
    assert [type(t) for t in train] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandAugment, v2.PILToTensor]
    assert train[0].size == (224, 224) and (train[2].num_ops, train[2].magnitude, train[2].num_magnitude_bins) == (2, 15, 31)
    test = bundle.test.loader.dataset.transform.transforms
    assert [type(t) for t in test] == [v2.Resize, v2.CenterCrop, v2.PILToTensor]
    assert test[0].size == [224] and test[1].size == (224, 224)
    assert (bundle.mean, bundle.std) == IMAGENET_STATS
    x, y = next(bundle.train.epoch(0))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32 and y.shape == (2,)


def test_randaugment_replays_from_seed_epoch_and_batch():
    """Per sample in the DataLoader workers' path, under the seed of (seed, epoch, batch, position)."""
    cfg = DataConfig(
        name="synthetic", loader="dataloader", batch_size=16, synthetic_train_size=64, num_workers=0, randaugment_magnitude=15
    )
    a, b = build_data(cfg, CPU, seed=1).train, build_data(cfg, CPU, seed=1).train
    first = [x for x, _ in a.epoch(2)]
    assert all(torch.equal(p, q) for p, (q, _) in zip(first, b.epoch(2)))
    assert all(torch.equal(p, q) for p, (q, _) in zip(first[1:], a.epoch(2, start=1)))  # a resumed epoch
    plain = build_data(DataConfig(**{**cfg.__dict__, "randaugment_magnitude": None}), CPU, seed=1).train
    assert not torch.equal(first[0], next(plain.epoch(2))[0])  # it does change the images


@pytest.mark.parametrize(
    "data",
    [
        {"name": "synthetic"},
        {"name": "cifar10", "loader": "device"},
        {"name": "imagefolder", "root": "/nowhere", "image_size": 32},
    ],
)
def test_randaugment_on_the_device_loader_is_refused_with_the_fix(data):
    with pytest.raises(ConfigError, match=r"data\.randaugment_magnitude=9 .* set data\.loader=dataloader"):
        build_data(DataConfig(**data, randaugment_magnitude=9), CPU)


def test_one_real_step_of_the_recipe_at_224_px(tmp_path):
    root, run_dir = tmp_path / "imagenet", tmp_path / "run"
    write_fake_imagefolder(root, ["n01", "n02", "n03"], 2, (256, 240), split_names=("train", "val"), fmt="jpg")
    run_hydra(
        target_main,
        [
            "experiment=target_imagenet",
            f"data.root={root}",
            "arch=tiny",
            "scales=init",
            "data.batch_size=4",
            "data.eval_batch_size=6",
            "data.num_workers=0",
            "epochs=1",
            "sched.warmup_epochs=0",
            "max_steps_per_epoch=1",
            "deploy=false",
            "device=cpu",
            "compile=false",
            "optim.compile_step=false",
            "progress=off",
            f"hydra.run.dir={run_dir}",
        ],
    )
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "completed" and (metrics["steps"], metrics["epochs"]) == (1, 1)
    assert metrics["dataset"] == "imagefolder" and metrics["optimizer"] == "RepOptSGD" and 0 <= metrics["top1"] <= 100
    assert (run_dir / "best.pt").is_file() and (run_dir / "history.csv").is_file()
