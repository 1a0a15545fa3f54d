"""Samplers: a per-epoch shuffle that a resumed run repeats, and exact evaluation shards."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


def run_seed() -> int:
    """Returns the run's seed: what ``seed_everything`` (``--seed_everything``) set, else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def epoch_seed(seed: int, epoch: int, offset: int = 0) -> int:
    """Returns the seed of one epoch's randomness, a function of the run's seed and epoch only."""
    return (seed * 1_000_003 + epoch * 7919 + offset) % 2**63


class EpochShuffle(Sampler[int]):
    """A fresh permutation of the split every epoch, drawn from (seed, epoch) only.

    So a run resumed at epoch e sees the order the uninterrupted run saw (``RandomSampler`` draws
    from the global generator, and Lightning builds the first iterator of a resumed run before it
    tells samplers the epoch). Under DDP rank r takes every W-th index of the permutation, padded
    by repeating its start to a multiple of W, as ``DistributedSampler`` does.

    Args:
        size: clips in the split.
        epoch: returns the current epoch when an epoch's iteration starts.
        num_replicas: DDP world size.
        rank: this process's rank.
    """

    def __init__(self, size: int, epoch: Callable[[], int], num_replicas: int = 1,
                 rank: int = 0) -> None:
        self.size, self.epoch, self.num_replicas, self.rank = size, epoch, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(run_seed(), self.epoch()))
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.num_replicas > 1:
            order += order[: len(self) * self.num_replicas - self.size]
            order = order[self.rank::self.num_replicas]
        return iter(order)

    def __len__(self) -> int:
        return -(-self.size // self.num_replicas)


class EvalShardSampler(Sampler[int]):
    """Gives rank ``rank`` of ``num_replicas`` the indices rank, rank + W, ... without padding.

    Over all ranks every index appears exactly once, so metrics over the whole split stay exact
    (ranks may get one sample more or less than each other).
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.size, self.num_replicas, self.rank = size, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.num_replicas))
