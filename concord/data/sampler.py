"""Deterministic per-epoch sharding: each worker its disjoint slice of a shuffled index."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from concord.algorithms.assign import check_rank


def shard_indices(
    num_samples: int, rank: int, world: int, seed: int, epoch: int, shuffle: bool, drop_last: bool
) -> list[int]:
    """The indices worker ``rank`` of ``world`` reads in ``epoch``.

    The permutation depends only on ``seed`` and ``epoch``; shard ``rank`` takes every
    ``world``-th index starting at ``rank``. With ``drop_last`` every shard has
    ``num_samples // world`` samples (the tail is dropped); without it the shards are
    disjoint, their union is the dataset, and sizes differ by at most one.
    """
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(num_samples, generator=gen).tolist()
    else:
        order = list(range(num_samples))
    if drop_last:
        order = order[: num_samples - num_samples % world]
    return order[rank::world]


class ShardedSampler(Sampler[int]):
    """Disjoint, complete, per-epoch reshuffled shards; rank and world are explicit.

    Call ``set_epoch(e)`` before each epoch to get a fresh shuffle (as with PyTorch's
    DistributedSampler).
    """

    def __init__(
        self,
        num_samples: int,
        rank: int,
        world: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        check_rank(rank, world, num_samples)
        self.num_samples, self.rank, self.world = num_samples, rank, world
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        return shard_indices(
            self.num_samples,
            self.rank,
            self.world,
            self.seed,
            self.epoch,
            self.shuffle,
            self.drop_last,
        )

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.world
        return len(range(self.rank, self.num_samples, self.world))
