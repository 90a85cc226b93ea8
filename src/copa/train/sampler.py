"""A deterministic, resumable, rank-aware sample order.

Epoch ``e`` visits a permutation drawn from ``(seed, e)``; rank ``r`` of ``w`` takes every ``w``-th
entry. The stream is endless and starts at any position, so a resumed run continues with exactly
the samples the uninterrupted run would have seen. Each yielded value encodes ``epoch * n + index``
so the dataset can seed each sample's augmentation from it (``EpochSeeded``), independent of
DataLoader workers and of how many steps ran before.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler[int]):
    def __init__(
        self, n: int, seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True, start: int = 0
    ) -> None:
        if n < world:
            raise ValueError(f"{n} samples cannot be split over {world} processes")
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.per_rank = n // world  # equal share per rank so every rank runs the same number of steps
        self.start = start  # position in this rank's stream (samples already consumed)

    def order(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        else:
            perm = np.arange(self.n)
        return perm[self.rank : self.per_rank * self.world : self.world]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            for i in self.order(epoch)[offset:]:
                yield int(epoch * self.n + i)
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # one epoch; the iterator itself is endless
        return self.per_rank


class BoxedMixSampler(Sampler[int]):
    """Every batch of ``batch_size`` holds ``boxed`` samples from the ``pool`` (the images that carry
    boxes) and ``batch_size - boxed`` from the plain stream over all samples.

    PTA learns only from boxed images; with ~5% of the images boxed, plain shuffling shows a batch of
    32 one or two of them, and a short run a few dozen in all. Oversampling keeps the share of boxed
    *images* in the data as it is (the paper's setting) while giving every step the same PTA signal.
    Both streams are ``ResumableSampler``-style (seeded per epoch, rank-strided, resumable at any
    sample position that is a multiple of ``batch_size``); keys are ``epoch * n + index`` as there.
    """

    def __init__(
        self,
        n: int,
        pool: list[int],
        boxed: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
    ) -> None:
        if not 0 < boxed < batch_size:
            raise ValueError(f"boxed_per_batch must be in (0, batch_size={batch_size}), got {boxed}")
        if len(pool) < world:
            raise ValueError(f"{len(pool)} boxed images cannot be split over {world} processes")
        self.pool = np.asarray(pool, dtype=np.int64)
        self.n, self.boxed, self.batch_size = n, boxed, batch_size
        batches = start // batch_size
        self.plain = ResumableSampler(n, seed, rank, world, True, batches * (batch_size - boxed))
        self.extra = ResumableSampler(len(pool), seed + 7919, rank, world, True, batches * boxed)

    def __iter__(self) -> Iterator[int]:
        plain, extra = iter(self.plain), iter(self.extra)
        while True:
            for _ in range(self.batch_size - self.boxed):
                yield next(plain)
            for _ in range(self.boxed):
                epoch, j = divmod(next(extra), len(self.pool))
                yield int(epoch * self.n + self.pool[j])

    def __len__(self) -> int:
        return len(self.plain)


class EpochSeeded(Dataset):
    """Wraps a ``PretrainDataset``: item ``epoch * n + i`` is sample ``i`` augmented with an RNG
    seeded by ``(seed, epoch, i)``."""

    def __init__(self, base: Any, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int) -> Any:
        epoch, i = divmod(int(key), len(self.base))
        sample = self.base.get(i, np.random.default_rng([self.seed, epoch, i]))
        if epoch and isinstance(sample, dict) and sample.get("events"):
            # an image that fails to load fails in every epoch: its events are counted in the first
            sample["events"] = {}
        return sample


def loader_generator(seed: int) -> torch.Generator:
    """A private generator for DataLoader, so building an iterator never draws from the global RNG."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g
