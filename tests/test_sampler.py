"""ShardedSampler: disjoint, complete, deterministic, reshuffled per epoch, uneven sizes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from concord.data.sampler import ShardedSampler


def _shards(n: int, world: int, epoch: int = 0, seed: int = 0, **kw) -> list[list[int]]:
    out = []
    for rank in range(world):
        sampler = ShardedSampler(n, rank, world, seed=seed, **kw)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), world=st.integers(1, 8), epoch=st.integers(0, 5))
def test_disjoint_and_complete(n, world, epoch):
    shards = _shards(n, world, epoch)
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(n))  # complete, and no index twice
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # uneven sizes differ by at most one
    assert sizes == [len(ShardedSampler(n, r, world)) for r in range(world)]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), world=st.integers(1, 8))
def test_drop_last_gives_equal_shards(n, world):
    shards = _shards(n, world, drop_last=True)
    assert all(len(s) == n // world for s in shards)
    flat = [i for shard in shards for i in shard]
    assert len(set(flat)) == len(flat) == (n // world) * world


def test_hand_checked_uneven_split_without_shuffle():
    assert _shards(10, 3, shuffle=False) == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert _shards(10, 3, shuffle=False, drop_last=True) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_deterministic_for_seed_and_different_per_epoch_and_seed():
    assert _shards(1000, 4, epoch=2, seed=7) == _shards(1000, 4, epoch=2, seed=7)
    assert _shards(1000, 4, epoch=2, seed=7) != _shards(1000, 4, epoch=3, seed=7)
    assert _shards(1000, 4, epoch=2, seed=7) != _shards(1000, 4, epoch=2, seed=8)


@pytest.mark.parametrize(
    ("args", "message"),
    [((10, 2, 2), "outside world"), ((10, 0, 0), "world must be"), ((-1, 0, 1), "num_samples")],
)
def test_bad_arguments_are_clear(args, message):
    with pytest.raises(ValueError, match=message):
        ShardedSampler(*args)
