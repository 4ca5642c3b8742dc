"""Stage splits: explicit cut points and the balanced (min-max) partition."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from concord.algorithms.partition import Split, balanced_split, explicit_split
from concord.errors import UsageError

# Flatten, Linear 784-512, ReLU, Linear 512-256, ReLU, Linear 256-128, ReLU, Linear 128-10
MLP_PARAMS = [0, 784 * 512 + 512, 0, 512 * 256 + 256, 0, 256 * 128 + 128, 0, 128 * 10 + 10]


def test_mlp_by_parameter_count_keeps_activations_with_their_linear():
    split = balanced_split(MLP_PARAMS, 3)
    # the first Linear alone is the floor (401,920); the rest is split as evenly as it goes,
    # and each ReLU stays behind the Linear before it
    assert split.ranges() == [range(0, 3), range(3, 5), range(5, 8)]
    assert split.costs(MLP_PARAMS) == [401920, 131328, 34186]


def test_balanced_split_minimizes_the_largest_stage():
    # by hand: [5 | 1 1 1 1 1 | 5] -> max 5 is optimal
    assert balanced_split([5, 1, 1, 1, 1, 1, 5], 3).starts == (0, 1, 6)
    # equal costs split evenly; 6 layers in 4 stages: two stages of two (later stages shorter)
    assert balanced_split([1] * 6, 4).ranges() == [
        range(0, 2),
        range(2, 4),
        range(4, 5),
        range(5, 6),
    ]
    assert balanced_split([3, 3, 3], 1).starts == (0,)
    assert balanced_split([1, 2, 3], 3).starts == (0, 1, 2)
    # measured seconds: the slow layer gets a stage to itself
    assert balanced_split([0.1, 0.1, 0.9, 0.1, 0.2], 3).starts == (0, 2, 3)


def test_explicit_split_and_its_errors():
    assert explicit_split(8, 3, [3, 5]).ranges() == [range(0, 3), range(3, 5), range(5, 8)]
    with pytest.raises(UsageError, match="3 stages need 2"):
        explicit_split(8, 3, [3])
    with pytest.raises(UsageError, match="increase strictly"):
        explicit_split(8, 3, [5, 3])
    with pytest.raises(UsageError, match="stay below 8"):
        explicit_split(8, 3, [3, 8])
    with pytest.raises(UsageError, match="must be integers"):
        explicit_split(8, 3, [3, 4.5])


def test_too_few_layers_or_bad_costs():
    with pytest.raises(UsageError, match="cannot cut 2 layer.s. into 3 stages"):
        balanced_split([1, 1], 3)
    with pytest.raises(UsageError, match="must be >= 0"):
        balanced_split([1, -1], 2)
    with pytest.raises(UsageError, match="stages must be >= 1"):
        balanced_split([1], 0)
    with pytest.raises(UsageError, match="begin at 0"):
        Split((1, 2), 4)


@settings(max_examples=150, deadline=None)
@given(
    costs=st.lists(st.integers(0, 50), min_size=1, max_size=9),
    stages=st.integers(1, 5),
)
def test_balanced_split_matches_brute_force(costs, stages):
    if stages > len(costs):
        return
    best = min(
        max(Split((0, *cuts), len(costs)).costs(costs))
        for cuts in itertools.combinations(range(1, len(costs)), stages - 1)
    )
    split = balanced_split(costs, stages)
    assert split.stages == stages
    assert max(split.costs(costs)) == best
