"""Data: real on-disk formats through torchvision's parsers, offline errors, deterministic resumable
batches, device-side augmentation, sharding, the image-folder cache and the DataLoader path."""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repopt.config import DataConfig
from repopt.data import Batches, DataBundle, build_data
from repopt.data import decode as decode_module
from repopt.data import imagefolder as imagefolder_module
from repopt.data.augment import crop_flip, crop_params
from repopt.data.build import subset_indices
from repopt.data.seeding import AUGMENT_STREAM, epoch_permutation, generator
from repopt.data.tensor_batches import TensorBatches
from repopt.errors import DataError

from .helpers.fake_datasets import (
    write_fake_cifar10,
    write_fake_cifar100,
    write_fake_fashionmnist,
    write_fake_imagefolder,
)

CPU = torch.device("cpu")
SHARED_CIFAR10_JPEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any download attempt fails as it does offline (and never touches the network)."""

    def offline(*args, **kwargs):
        raise URLError("offline (test)")

    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "download_url", offline)
    monkeypatch.setattr("urllib.request.urlopen", offline)


def _cfg(**kw) -> DataConfig:
    base = dict(download=False, verify_checksums=False, batch_size=32, eval_batch_size=64, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def _unnormalize(x: torch.Tensor, bundle: DataBundle) -> torch.Tensor:
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


def _collect(batches, epoch=0, start=0):
    return list(batches.epoch(epoch, start))


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)


# ------------------------------------------------------------------------------------- CIFAR formats


def test_fake_cifar100_loads_through_torchvision_parser(tmp_path):
    written = write_fake_cifar100(tmp_path, n_train=200, n_test=100)
    bundle = build_data(_cfg(name="cifar100", root=str(tmp_path)), CPU)
    assert isinstance(bundle.train, Batches) and isinstance(bundle.test, Batches)
    assert bundle.num_classes == 100 and bundle.class_names == written["class_names"]
    assert bundle.mean == (0.5071, 0.4865, 0.4409) and bundle.std == (0.2673, 0.2564, 0.2762)
    assert bundle.train.num_samples == 200 and bundle.test.num_samples == 100
    assert len(bundle.train) == 200 // 32 and len(bundle.test) == 2  # test never drops its last batch

    test = _collect(bundle.test)
    x = torch.cat([b[0] for b in test])
    y = torch.cat([b[1] for b in test])
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(written["test_labels"]))
    expected = torch.from_numpy(written["test_data"]).permute(0, 3, 1, 2)
    assert torch.equal(_unnormalize(x[:1], bundle), expected[:1])  # the first image, pixel for pixel
    assert torch.equal(_unnormalize(x, bundle), expected)  # and every other one

    train_labels = torch.cat([b[1] for b in _collect(bundle.train)])
    assert train_labels.shape == (192,)
    assert set(train_labels.tolist()) <= set(written["train_labels"].tolist())


def test_fake_cifar10_and_subsets(tmp_path):
    written = write_fake_cifar10(tmp_path, n_train=100, n_test=50)
    bundle = build_data(_cfg(name="cifar10", root=str(tmp_path), train_subset=64, test_subset=20, batch_size=16), CPU)
    assert bundle.num_classes == 10 and bundle.class_names == written["class_names"]
    assert bundle.mean == (0.4914, 0.4822, 0.4465)
    assert bundle.train.num_samples == 64 and bundle.test.num_samples == 20 and len(bundle.train) == 4
    y = torch.cat([b[1] for b in _collect(bundle.test)])
    assert torch.equal(y, torch.from_numpy(written["test_labels"][:20]))  # the first N, in order


def test_archive_only_is_extracted_and_loads(tmp_path):
    written = write_fake_cifar100(tmp_path, n_train=64, n_test=40, as_archive=True)
    assert not (tmp_path / "cifar-100-python").exists()
    assert (tmp_path / "cifar-100-python.tar.gz").is_file()
    bundle = build_data(_cfg(name="cifar100", root=str(tmp_path)), CPU)
    assert (tmp_path / "cifar-100-python" / "train").is_file()
    y = torch.cat([b[1] for b in _collect(bundle.test)])
    assert torch.equal(y, torch.from_numpy(written["test_labels"]))


@pytest.mark.parametrize("download", [True, False])
def test_offline_without_files_explains_where_to_put_them(tmp_path, download):
    root = tmp_path / "empty-root"
    with pytest.raises(DataError) as err:
        build_data(_cfg(name="cifar100", root=str(root), download=download), CPU)
    msg = str(err.value)
    assert "cifar-100-python.tar.gz" in msg and str(root) in msg
    assert "data=cifar10" in msg and "data=synthetic" in msg and "data=imagefolder" in msg
    if download:
        assert "offline (test)" in msg  # the network failure is reported, not hidden


def test_checksum_mismatch_names_the_setting(tmp_path):
    write_fake_cifar10(tmp_path, n_train=20, n_test=10)
    with pytest.raises(DataError, match="verify_checksums=false"):
        build_data(_cfg(name="cifar10", root=str(tmp_path), verify_checksums=True), CPU)


def test_fashionmnist_gray_to_rgb_padded(tmp_path):
    written = write_fake_fashionmnist(tmp_path, n_train=60, n_test=20, gzipped=True)
    bundle = build_data(_cfg(name="fashionmnist", root=str(tmp_path), batch_size=20), CPU)
    assert bundle.num_classes == 10 and bundle.mean == (0.2860,) * 3
    x, y = next(iter(bundle.test.epoch(0)))
    assert x.shape == (20, 3, 32, 32)
    u8 = _unnormalize(x, bundle)
    assert torch.equal(u8[:, 0], u8[:, 1]) and torch.equal(u8[:, 0], u8[:, 2])
    assert (u8[:, :, :2] == 0).all() and (u8[:, :, :, -2:] == 0).all()  # 2 px zero pad
    assert torch.equal(u8[:, 0, 2:30, 2:30], torch.from_numpy(written["test"][0]))
    assert torch.equal(y, torch.from_numpy(written["test"][1]))


# ---------------------------------------------------------------------------- determinism and resume


def test_resume_mid_epoch_gives_the_same_batches():
    bundle = build_data(_cfg(name="synthetic", batch_size=64), CPU, seed=7)
    full = _collect(bundle.train, epoch=3)
    assert len(full) == 512 // 64
    for k in (1, 5, len(full)):
        _assert_same_batches(_collect(bundle.train, epoch=3, start=k), full[k:])
    _assert_same_batches(_collect(bundle.train, epoch=3), full)  # and again from scratch
    with pytest.raises(DataError):
        bundle.train.epoch(0, start=len(full) + 1)


def test_epochs_are_different_permutations():
    n = 100
    images = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    tb = TensorBatches(
        images,
        torch.arange(n),
        CPU,
        batch_size=10,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        augment=True,
        drop_last=True,
        seed=3,
        padding=0,
        hflip=False,
    )
    orders = [torch.cat([y for _, y in tb.epoch(e)]) for e in range(3)]
    for order in orders:
        assert torch.equal(order.sort().values, torch.arange(n))  # every sample once per epoch
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    other_seed = TensorBatches(
        images, torch.arange(n), CPU, batch_size=10, mean=(0, 0, 0), std=(1, 1, 1), augment=True, drop_last=True, seed=4
    )
    assert not torch.equal(torch.cat([y for _, y in other_seed.epoch(0)]), orders[0])


def test_random_crop_matches_per_sample_slicing():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 12, 10), dtype=torch.uint8, generator=g)
    pad = 3
    params = crop_params(16, pad, True, g)
    out = crop_flip(images, params, pad)
    assert out.shape == images.shape and out.is_contiguous()
    assert params[2].any() and not params[2].all()
    for i in range(16):
        dy, dx, flip = params[:, i].tolist()
        ref = F.pad(images[i], (pad, pad, pad, pad))[:, dy : dy + 12, dx : dx + 10]
        if flip:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref), i
    # a centred crop with the flag set is exactly a horizontal flip, without it the identity
    centred = torch.tensor([[pad] * 16, [pad] * 16, [1] * 8 + [0] * 8])
    out = crop_flip(images, centred, pad)
    assert torch.equal(out[:8], images[:8].flip(-1)) and torch.equal(out[8:], images[8:])


def test_train_batches_apply_the_seeded_augmentation():
    g = torch.Generator().manual_seed(1)
    n, pad, seed, epoch = 40, 4, 5, 2
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    tb = TensorBatches(
        images,
        torch.arange(n),
        CPU,
        batch_size=8,
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.3),
        augment=True,
        drop_last=True,
        seed=seed,
        padding=pad,
        hflip=True,
    )
    perm = epoch_permutation(n, seed, epoch, True)
    for b, (x, y) in enumerate(tb.epoch(epoch)):
        idx = perm[b * 8 : (b + 1) * 8]
        assert torch.equal(y, idx)
        params = crop_params(8, pad, True, generator(seed, epoch, AUGMENT_STREAM, b))
        for i in range(8):
            dy, dx, flip = params[:, i].tolist()
            ref = F.pad(images[idx[i]], (pad,) * 4)[:, dy : dy + 16, dx : dx + 16]
            ref = ref.flip(-1) if flip else ref
            mean = torch.tensor((0.5, 0.4, 0.3)).view(3, 1, 1)
            std = torch.tensor((0.2, 0.25, 0.3)).view(3, 1, 1)
            torch.testing.assert_close(x[i], (ref.float() / 255 - mean) / std, rtol=0, atol=1e-5)


@pytest.mark.parametrize("split", ["train", "test"])
def test_two_ranks_concatenate_to_one_rank(split):
    cfg = _cfg(name="synthetic", batch_size=64, eval_batch_size=60, synthetic_test_size=250)
    one = getattr(build_data(cfg, CPU, seed=1), split)
    ranks = [getattr(build_data(cfg, CPU, seed=1, rank=r, world_size=2), split) for r in range(2)]
    assert all(len(r) == len(one) for r in ranks) and ranks[0].num_samples == one.num_samples
    for e in (0, 1):
        for (x, y), (x0, y0), (x1, y1) in zip(one.epoch(e), ranks[0].epoch(e), ranks[1].epoch(e)):
            assert x0.shape[0] == x.shape[0] // 2
            assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_batch_must_divide_by_world_size():
    with pytest.raises(DataError, match="world size 3"):
        build_data(_cfg(name="synthetic", batch_size=64), CPU, rank=0, world_size=3)


def test_synthetic_is_deterministic_and_independent_of_the_run_seed():
    a = build_data(_cfg(name="synthetic"), CPU, seed=0)
    b = build_data(_cfg(name="synthetic"), CPU, seed=123)
    _assert_same_batches(_collect(a.test), _collect(b.test))  # same data
    _assert_same_batches(_collect(a.train), _collect(build_data(_cfg(name="synthetic"), CPU, seed=0).train))
    assert not torch.equal(_collect(a.train)[0][1], _collect(b.train)[0][1])  # different order
    assert a.num_classes == 10 and a.train.num_samples == 512 and a.test.num_samples == 256


@pytest.fixture
def one_thread():
    # tiny convs are dominated by thread start-up; one thread is faster and reproducible
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_synthetic_is_learnable_by_a_tiny_cnn(one_thread):
    torch.manual_seed(0)
    bundle = build_data(_cfg(name="synthetic", batch_size=64), CPU)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, bundle.num_classes),
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for e in range(15):  # 120 steps, with the crop + flip augmentation
        for x, y in bundle.train.epoch(e):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        correct = sum((net(x).argmax(1) == y).sum().item() for x, y in bundle.test.epoch(0))
    assert correct / bundle.test.num_samples > 0.6  # chance is 0.1


# ------------------------------------------------------------------------------------ image folders


def test_imagefolder_decodes_once_and_reloads_from_the_cache(tmp_path, monkeypatch):
    root = tmp_path / "folder"
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("REPOPT_CACHE_DIR", str(cache_dir))  # the default place when data.cache_dir is unset
    written = write_fake_imagefolder(root, ["cat", "dog", "emu"], n_per_class=12, size=16, split_names=("train", "val"))
    cfg = _cfg(name="imagefolder", root=str(root), image_size=16, batch_size=8, eval_batch_size=10)
    first = build_data(cfg, CPU)
    assert first.class_names == ["cat", "dog", "emu"] and first.num_classes == 3
    caches = sorted(cache_dir.glob("*.pt"))
    assert len(caches) == 2 and not list(cache_dir.glob("*.tmp"))

    x = torch.cat([b[0] for b in _collect(first.test)])
    y = torch.cat([b[1] for b in _collect(first.test)])
    assert torch.equal(_unnormalize(x, first), torch.from_numpy(written["val"][0]))  # PNG is lossless
    assert torch.equal(y, torch.from_numpy(written["val"][1]))
    train_u8 = torch.from_numpy(written["train"][0]).float() / 255
    np.testing.assert_allclose(first.mean, train_u8.mean((0, 2, 3)).tolist(), atol=1e-6)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(imagefolder_module, "decode_files", no_decoding)
    second = build_data(cfg, CPU)
    assert second.mean == first.mean
    _assert_same_batches(_collect(second.test), _collect(first.test))
    _assert_same_batches(_collect(second.train, 1), _collect(first.train, 1))

    # a changed file changes the key: the folder is decoded again
    monkeypatch.setattr(imagefolder_module, "decode_files", decode_module.decode_files)
    time.sleep(0.01)
    png = root / "val" / "dog" / "0000.png"
    os.utime(png, ns=(time.time_ns(), time.time_ns()))
    build_data(cfg, CPU)
    assert len(list(cache_dir.glob("*.pt"))) == 3


def test_imagefolder_cache_falls_back_to_home_when_unwritable(tmp_path, monkeypatch):
    root = tmp_path / "folder"
    write_fake_imagefolder(root, ["a", "b"], n_per_class=4, size=8)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REPOPT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    build_data(_cfg(name="imagefolder", root=str(root), image_size=8, batch_size=4, cache_dir=str(blocker / "c")), CPU)
    assert len(list((tmp_path / "home" / ".cache" / "repopt" / "decoded").glob("*.pt"))) == 2


def test_imagefolder_resizes_files_of_another_size(tmp_path):
    root = tmp_path / "folder"
    write_fake_imagefolder(root, ["a", "b"], n_per_class=4, size=(20, 24), fmt="jpg")
    bundle = build_data(_cfg(name="imagefolder", root=str(root), image_size=16, batch_size=4), CPU)
    x, _ = next(iter(bundle.test.epoch(0)))
    assert x.shape == (8, 3, 16, 16) and torch.isfinite(x).all()


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_data(_cfg(name="imagefolder", root=str(tmp_path / "missing")), CPU)
    write_fake_imagefolder(tmp_path / "mix", ["a", "b"], 2, 8, split_names=("train",))
    write_fake_imagefolder(tmp_path / "mix", ["a", "c"], 2, 8, split_names=("test",))
    with pytest.raises(DataError) as err:
        build_data(_cfg(name="imagefolder", root=str(tmp_path / "mix"), image_size=8, batch_size=2), CPU)
    assert "differ" in str(err.value) and "only in train: b" in str(err.value) and "only in test: c" in str(err.value)
    write_fake_imagefolder(tmp_path / "noeval", ["a"], 2, 8, split_names=("train",))
    with pytest.raises(DataError, match="val"):
        build_data(_cfg(name="imagefolder", root=str(tmp_path / "noeval"), image_size=8), CPU)
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        build_data(_cfg(name="imagefolder", root=str(tmp_path / "empty"), image_size=8), CPU)


def test_bad_configuration_errors(tmp_path):
    with pytest.raises(DataError) as err:
        build_data(_cfg(name="imagenet21k"), CPU)
    assert all(n in str(err.value) for n in ("cifar100", "cifar10", "imagefolder", "fashionmnist", "synthetic"))
    with pytest.raises(DataError, match="drop_last"):
        build_data(_cfg(name="synthetic", batch_size=1024), CPU)
    build_data(_cfg(name="synthetic", batch_size=1024, drop_last=False), CPU)  # fine without drop_last
    write_fake_imagefolder(tmp_path / "big", ["a", "b"], 2, 8)
    with pytest.raises(DataError, match="loader=auto"):
        build_data(_cfg(name="imagefolder", root=str(tmp_path / "big"), image_size=96, loader="device"), CPU)


def test_subset_of_a_folder_keeps_every_class():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    keep = subset_indices(labels, 6, ordered_by_class=True)
    assert torch.equal(keep, torch.tensor([0, 1, 5, 6, 8, 9]))
    assert torch.equal(subset_indices(labels, 4, ordered_by_class=False), torch.arange(4))
    assert subset_indices(labels, 50, ordered_by_class=True) is None


def test_dataloader_path_yields_normalized_resumable_batches(tmp_path):
    root = tmp_path / "large"
    write_fake_imagefolder(root, ["a", "b", "c"], n_per_class=4, size=(80, 90), fmt="jpg")
    cfg = _cfg(name="imagefolder", root=str(root), image_size=72, batch_size=4, eval_batch_size=5, random_resized_crop=True)
    bundle = build_data(cfg, CPU, seed=2)
    assert bundle.mean == (0.485, 0.456, 0.406) and len(bundle.train) == 3 and len(bundle.test) == 3
    train = _collect(bundle.train, epoch=1)
    for x, y in train:
        assert x.shape == (4, 3, 72, 72) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.isfinite(x).all() and -3 < x.mean() < 3
    _assert_same_batches(_collect(bundle.train, epoch=1, start=1), train[1:])
    _assert_same_batches(_collect(bundle.train, epoch=1), train)  # the augmentation is seeded too
    assert not torch.equal(torch.cat([y for _, y in train]), torch.cat([y for _, y in _collect(bundle.train, 2)]))
    test = _collect(bundle.test)
    assert [x.shape[0] for x, _ in test] == [5, 5, 2]
    assert torch.equal(torch.cat([y for _, y in test]), torch.tensor([0] * 4 + [1] * 4 + [2] * 4))

    halves = [build_data(cfg, CPU, seed=2, rank=r, world_size=2).train for r in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(train, halves[0].epoch(1), halves[1].epoch(1)):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)

    workers = build_data(_cfg(**{**cfg.__dict__, "num_workers": 2}), CPU, seed=2)
    _assert_same_batches(_collect(workers.train, epoch=1), train)  # independent of the worker count


def test_dataloader_path_for_tensor_sets_matches_shapes():
    bundle = build_data(_cfg(name="synthetic", loader="dataloader", batch_size=64, image_size=32), CPU)
    x, y = next(iter(bundle.train.epoch(0)))
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,)
    device_path = build_data(_cfg(name="synthetic", batch_size=64), CPU)
    _assert_same_batches(_collect(bundle.test), _collect(device_path.test))  # no augmentation: identical


def test_train_transform_size_resizes_training_batches():
    bundle = build_data(_cfg(name="synthetic", batch_size=64), CPU, train_transform_size=24)
    x, _ = next(iter(bundle.train.epoch(0)))
    assert x.shape == (64, 3, 24, 24)
    assert next(iter(bundle.test.epoch(0)))[0].shape[-1] == 32


# ------------------------------------------------------------------------- the real CIFAR-10 (JPEG)


def test_shared_cifar10_jpeg_through_imagefolder(cifar10_jpeg):
    cfg = _cfg(name="imagefolder", root=str(cifar10_jpeg), image_size=32, batch_size=500, eval_batch_size=1000)
    bundle = build_data(cfg, CPU)
    assert bundle.train.num_samples == 50_000 and bundle.test.num_samples == 10_000
    assert bundle.num_classes == 10 and len(bundle.class_names) == 10
    np.testing.assert_allclose(bundle.mean, (0.4913, 0.4821, 0.4465), atol=1e-3)
    x, y = next(iter(bundle.test.epoch(0)))
    assert x.shape == (1000, 3, 32, 32) and torch.isfinite(x).all()
    assert torch.equal(y, torch.zeros(1000, dtype=torch.int64))  # the first test class, in file order
