"""Pure placement plans (concord.algorithms.assign), answers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from concord.algorithms.assign import (
    ShardSlice,
    check_complete,
    inverse,
    owned_ids,
    part_bounds,
    receive_rows,
    send_plan,
    shard_slices,
)
from concord.errors import ConcordError


def test_part_bounds_by_hand():
    # 10 items over 3 workers: 4, 3, 3
    assert [part_bounds(10, 3, r) for r in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    assert [len(part_bounds(2, 4, r)) for r in range(4)] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="rank 3 is outside world 3"):
        part_bounds(10, 3, 3)


def test_shard_slices_by_hand():
    # shards of 4, 1, 3, 2 samples laid out in order 2, 0, 3, 1 -> stream of 10 samples:
    # [s2:0..3][s0:0..4][s3:0..2][s1:0..1]; world 3 parts are [0,4) [4,7) [7,10)
    counts, order = [4, 1, 3, 2], [2, 0, 3, 1]
    assert shard_slices(counts, order, 3, 0) == [ShardSlice(2, 0, 3), ShardSlice(0, 0, 1)]
    assert shard_slices(counts, order, 3, 1) == [ShardSlice(0, 1, 4)]
    assert shard_slices(counts, order, 3, 2) == [ShardSlice(3, 0, 2), ShardSlice(1, 0, 1)]
    with pytest.raises(ValueError, match="permutation"):
        shard_slices(counts, [0, 1, 2, 2], 3, 0)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shard_slices_cover_every_sample_once(world):
    counts = [5, 0, 2, 9, 1, 3]
    order = [3, 1, 5, 0, 4, 2]
    seen = []
    for rank in range(world):
        pieces = shard_slices(counts, order, world, rank)
        assert sum(len(p) for p in pieces) == len(part_bounds(sum(counts), world, rank))
        seen += [(p.shard, i) for p in pieces for i in range(p.start, p.stop)]
    assert sorted(seen) == [(k, i) for k, c in enumerate(counts) for i in range(c)]


def test_exchange_plan_by_hand():
    # next epoch's permutation over 6 samples, world 2:
    # positions 0..5 hold ids 4 1 5 0 2 3 -> worker 0 owns ids 4, 5, 2 and worker 1 owns 1, 0, 3
    perm = torch.tensor([4, 1, 5, 0, 2, 3])
    inv = inverse(perm)
    assert inv.tolist() == [3, 1, 4, 5, 0, 2]
    assert owned_ids(perm, 2, 0).tolist() == [4, 5, 2]
    # worker 0 now holds ids 0, 1, 2: 0 and 1 go to worker 1, 2 stays (stable order)
    plan = send_plan(torch.tensor([0, 1, 2]), inv, 2)
    assert plan.order.tolist() == [2, 0, 1] and plan.counts == [1, 2]
    # worker 0 receives 2 (from itself) and 4, 5 (from worker 1): rows 2, 0, 1
    rows = receive_rows(torch.tensor([2, 4, 5]), inv, 2)
    assert rows.tolist() == [2, 0, 1]
    check_complete(rows, 3, 0)
    with pytest.raises(ConcordError, match="delivered 2 samples, expected 3"):
        check_complete(rows[:2], 3, 0)
