"""RandAugment in the per-sample transforms: exact replay and the device-loader refusal."""

from __future__ import annotations

import pytest
import torch

from repopt.config import DataConfig
from repopt.data import build_data
from repopt.errors import ConfigError

CPU = torch.device("cpu")


def test_randaugment_replays_from_seed_epoch_and_batch():
    """Per sample in the DataLoader workers' path, under the seed of (seed, epoch, batch, position)."""
    cfg = DataConfig(name="synthetic", loader="dataloader", batch_size=16, synthetic_train_size=64, num_workers=0,
                     randaugment_magnitude=15)
    a, b = build_data(cfg, CPU, seed=1).train, build_data(cfg, CPU, seed=1).train
    first = [x for x, _ in a.epoch(2)]
    assert all(torch.equal(p, q) for p, (q, _) in zip(first, b.epoch(2)))
    assert all(torch.equal(p, q) for p, (q, _) in zip(first[1:], a.epoch(2, start=1)))  # a resumed epoch
    plain = build_data(DataConfig(**{**cfg.__dict__, "randaugment_magnitude": None}), CPU, seed=1).train
    assert not torch.equal(first[0], next(plain.epoch(2))[0])  # it does change the images


@pytest.mark.parametrize("data", [{"name": "synthetic"}, {"name": "cifar10", "loader": "device"},
                                  {"name": "imagefolder", "root": "/nowhere", "image_size": 32}])
def test_randaugment_on_the_device_loader_is_refused_with_the_fix(data):
    with pytest.raises(ConfigError, match=r"data\.randaugment_magnitude=9 .* set data\.loader=dataloader"):
        build_data(DataConfig(**data, randaugment_magnitude=9), CPU)
