"""Batches as a pure function of the step number: exact resume and DDP sharding for free.

The stream of sample positions is the concatenation of per-epoch permutations (seeded by
(seed, epoch)); micro-step s of rank r takes positions s*B*W + r*B ... + B - 1 (B: per-process
batch, W: processes), so ranks never overlap and a resumed run continues at exactly the batch
an uninterrupted one would draw. Indices are encoded as epoch * N + i so the dataset can seed
its augmentation per (sample, epoch).

    >>> sampler = StepBatchSampler(n=1000, batch_size=32, seed=0, rank=0, world=2, start=0)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        stop: int | None = None,
    ):
        if n <= 0:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.start, self.stop = rank, world, start, stop
        self._perms: dict[int, torch.Tensor] = {}

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
            for old in [e for e in self._perms if e != epoch][:-1]:  # keep this and one more
                del self._perms[old]
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        first = (step * self.world + self.rank) * self.batch_size
        out = []
        for p in range(first, first + self.batch_size):
            epoch, i = divmod(p, self.n)
            out.append(epoch * self.n + int(self.perm(epoch)[i]))
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.world * self.batch_size / self.n

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while self.stop is None or step < self.stop:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("an unbounded sampler has no length")
        return self.stop - self.start
