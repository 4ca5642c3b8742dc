"""Bucket planning, as a pure function, with answers worked out by hand."""

from __future__ import annotations

import pytest

from concord.algorithms.buckets import ParamSpec, Slot, plan_buckets


def specs(*numels: int, key: str = "f32") -> list[ParamSpec]:
    return [ParamSpec(n, 4, key) for n in numels]


def test_reverse_order_and_cap():
    # 4-byte elements, cap 40 bytes = 10 elements; reverse order: 3 (6), 2 (5) -> 11 >= 10
    # closes bucket 0 = [3, 2]; then 1 (4), 0 (3) = 7 stays open -> bucket 1 = [1, 0]
    plan = plan_buckets(specs(3, 4, 5, 6), cap_bytes=40)
    assert [[s.param for s in b.slots] for b in plan.buckets] == [[3, 2], [1, 0]]
    assert plan.buckets[0].slots == (Slot(3, 0, 6), Slot(2, 6, 5))
    assert plan.buckets[0].grad_numel == 11
    assert plan.buckets[0].numel == 13  # + one presence flag per slot
    assert plan.bucket_of == (1, 1, 0, 0)


def test_small_first_bucket():
    # first cap 8 bytes = 2 elements: param 3 (6 elements) alone; then cap 40 as usual
    plan = plan_buckets(specs(3, 4, 5, 6), cap_bytes=40, first_cap_bytes=8)
    assert [[s.param for s in b.slots] for b in plan.buckets] == [[3], [2, 1, 0]]


def test_a_big_tensor_closes_its_bucket():
    plan = plan_buckets(specs(100, 1, 1), cap_bytes=16)
    assert [[s.param for s in b.slots] for b in plan.buckets] == [[2, 1, 0]]
    plan = plan_buckets(specs(1, 100, 1), cap_bytes=16)
    assert [[s.param for s in b.slots] for b in plan.buckets] == [[2, 1], [0]]


def test_dtypes_never_share_a_bucket():
    mixed = [ParamSpec(2, 4, "f32"), ParamSpec(2, 2, "bf16"), ParamSpec(2, 4, "f32")]
    plan = plan_buckets(mixed, cap_bytes=1000)
    assert [(b.key, [s.param for s in b.slots]) for b in plan.buckets] == [
        ("f32", [2, 0]),
        ("bf16", [1]),
    ]


def test_explicit_order_leaves_out_frozen():
    plan = plan_buckets(specs(1, 2, 3), cap_bytes=1000, order=[0, 2])
    assert plan.bucket_of == (0, None, 0)
    assert [s.param for s in plan.buckets[0].slots] == [0, 2]
    assert plan.max_numel == 4 + 2


def test_empty_and_bad_input():
    assert plan_buckets([], cap_bytes=10).buckets == ()
    with pytest.raises(ValueError, match="cap_bytes"):
        plan_buckets(specs(1), cap_bytes=0)
    with pytest.raises(ValueError, match="distinct"):
        plan_buckets(specs(1, 2), cap_bytes=10, order=[0, 0])
    with pytest.raises(ValueError, match="distinct"):
        plan_buckets(specs(1, 2), cap_bytes=10, order=[5])
