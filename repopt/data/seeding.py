"""Seeds derived from (run seed, epoch, batch index), so any batch can be regenerated on resume."""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import DataError

_MASK64 = (1 << 64) - 1

# Streams keep the permutation and the augmentation draws independent of each other.
PERMUTATION_STREAM = 1
AUGMENT_STREAM = 2
MIX_STREAM = 3  # mixup / CutMix draws of a training batch (repopt/data/mix.py)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (order matters; no collisions between nearby tuples)."""
    h = 0x2545F4914F6CDD1D
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h & ((1 << 63) - 1)


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (CPU so results are identical on every device)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(mix_seed(*parts))
    return g


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The sample order of one epoch: a permutation fixed by (seed, epoch), or 0..n-1."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=generator(seed, epoch, PERMUTATION_STREAM))


def shard_bounds(global_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous slice ``[lo, hi)`` of a global batch of ``global_size`` samples."""
    return rank * global_size // world_size, (rank + 1) * global_size // world_size


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def check_start(start: int, total: int) -> None:
    """Refuse a start batch outside ``0..total`` (``total`` itself is an empty rest of the epoch)."""
    if not 0 <= start <= total:
        raise DataError(f"start batch {start} is outside this epoch's 0..{total} batches")


def batch_shards(
    n: int, batch_size: int, start: int, total: int, rank: int, world_size: int
) -> Iterator[tuple[int, int, int, int]]:
    """``(b, lo, r0, r1)`` for batches ``start..total-1`` of ``n`` samples: global batch ``b`` begins at
    sample ``lo`` of the epoch order and this rank keeps its positions ``[r0, r1)`` of it."""
    for b in range(start, total):
        lo = b * batch_size
        r0, r1 = shard_bounds(min(batch_size, n - lo), rank, world_size)
        yield b, lo, r0, r1
