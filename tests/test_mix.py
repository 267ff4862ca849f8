"""Mixup / CutMix of a training batch (``mix.*``, repopt/data/mix.py): what the mixed batch and its
soft labels are, that the draws are a function of (seed, epoch, batch), and how a step scores them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from repopt.config import MixConfig
from repopt.data.mix import BatchMix
from repopt.engine.meter import EpochMeter
from repopt.engine.runtime import Runtime

C = 5
X = torch.randn(8, 3, 12, 10, generator=torch.Generator().manual_seed(0))  # continuous: x != x.roll(1, 0) everywhere
Y = torch.arange(8) % C  # every sample's partner (the one before it, cyclically) has another class


def _lam(soft: torch.Tensor) -> float:
    """lam of a mixed batch: the weight of each sample's own class (its partner's class differs)."""
    lam = soft[torch.arange(len(Y)), Y]
    assert torch.allclose(lam, lam[0].expand_as(lam))  # one lam per batch
    return float(lam[0])


def _check_soft(soft: torch.Tensor, lam: float) -> None:
    one_hot = F.one_hot(Y, C).float()
    assert soft.shape == (8, C) and soft.dtype == torch.float32
    assert torch.allclose(soft, lam * one_hot + (1 - lam) * one_hot.roll(1, 0), atol=1e-6)
    assert torch.allclose(soft.sum(1), torch.ones(8)) and bool((soft >= 0).all())


def test_mixup_is_the_convex_combination_with_the_previous_sample():
    mix = BatchMix(MixConfig(mixup_alpha=0.4), C, seed=0)
    x, soft = mix(X.clone(), Y, epoch=2, batch=5)
    lam = _lam(soft)
    assert 0 < lam < 1
    _check_soft(soft, lam)
    assert torch.allclose(x, lam * X + (1 - lam) * X.roll(1, 0), atol=1e-6)


def test_cutmix_pastes_one_box_of_the_previous_sample_with_lam_its_kept_area():
    mix = BatchMix(MixConfig(cutmix_alpha=1.0), C, seed=0)
    for batch in range(20):  # a few boxes: some hit the border, none should break the rules
        x, soft = mix(X.clone(), Y, epoch=0, batch=batch)
        lam = _lam(soft)
        _check_soft(soft, lam)
        pasted = x == X.roll(1, 0)
        assert bool((pasted | (x == X)).all())  # every pixel is the sample's own or its partner's
        box = pasted[0, 0]
        assert bool((pasted == box).all())  # the same box in every image and channel
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        if rows.numel():
            assert bool(box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all())  # a filled rectangle
        assert abs((1 - lam) - float(box.float().mean())) < 1e-6


def test_the_draws_depend_only_on_seed_epoch_and_batch():
    mix = BatchMix(MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0), C, seed=3)
    rng = torch.get_rng_state()
    a = mix(X.clone(), Y, epoch=1, batch=4)
    torch.manual_seed(12345)  # the global generator's state does not matter ...
    b = BatchMix(MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0), C, seed=3)(X.clone(), Y, epoch=1, batch=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.set_rng_state(rng)
    mix(X.clone(), Y, epoch=1, batch=4)
    assert torch.equal(torch.get_rng_state(), rng)  # ... and is left as it was
    others = [mix(X.clone(), Y, epoch=e, batch=k)[1] for e, k in ((1, 5), (2, 4))]
    assert all(not torch.equal(a[1], o) for o in others)
    other_seed = BatchMix(MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0), C, seed=4)(X.clone(), Y, epoch=1, batch=4)
    assert not torch.equal(a[1], other_seed[1])


def test_both_on_chooses_mixup_or_cutmix_per_batch():
    mix = BatchMix(MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5), C, seed=0)
    kinds = []
    for batch in range(40):
        x, _ = mix(X.clone(), Y, epoch=0, batch=batch)
        kinds.append("cutmix" if bool(((x == X) | (x == X.roll(1, 0))).all()) else "mixup")
    assert 5 <= kinds.count("cutmix") <= 35, kinds
    only_cutmix = BatchMix(MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=1.0), C, seed=0)
    assert all(bool(((x == X) | (x == X.roll(1, 0))).all()) for x, _ in (only_cutmix(X.clone(), Y, 0, b) for b in range(10)))


def test_prob_zero_leaves_the_batch_alone_with_one_hot_labels():
    x, soft = BatchMix(MixConfig(mixup_alpha=0.4, prob=0.0), C, seed=0)(X.clone(), Y, epoch=0, batch=0)
    assert torch.equal(x, X) and torch.equal(soft, F.one_hot(Y, C).float())
    assert BatchMix.build(MixConfig(), C, seed=0) is None  # both alphas 0: off


def test_soft_labels_are_scored_against_their_argmax_and_counted_per_sample():
    meter = EpochMeter(Runtime(torch.device("cpu"), None, False))
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.4, 0.0, 0.6], [0.0, 0.55, 0.45]])
    logits = torch.tensor([[2.0, 0.0, 0.0], [3.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    meter.add(torch.tensor(1.5), logits, soft)
    assert meter.count == 3 and float(meter.correct) == 2 and float(meter.loss_sum) == 4.5
    # and the loss of a mixed step is the cross-entropy against the soft (and smoothed) target
    smooth = 0.1
    expected = -((soft * (1 - smooth) + smooth / 3) * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(F.cross_entropy(logits, soft, label_smoothing=smooth), expected)
