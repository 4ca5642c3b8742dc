"""Where to cut a sequence of layers into pipeline stages (pure: lists of numbers in, cuts out).

* ``explicit_split``: the user names the cut points (the first layer of stages 1..P-1).
* ``balanced_split``: given a cost per layer (parameter count, or measured seconds), choose
  contiguous stages that minimize the most expensive stage; ties go to the split whose stage
  costs are most even (smallest sum of squares), then to later cuts, so a cost-free layer
  (ReLU, Flatten) stays with the layer before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from concord.errors import UsageError


@dataclass(frozen=True)
class Split:
    """Stage ``s`` holds layers ``starts[s]`` up to (not including) the next start."""

    starts: tuple[int, ...]
    n_layers: int

    def __post_init__(self) -> None:
        ok = (
            len(self.starts) >= 1
            and self.starts[0] == 0
            and all(a < b for a, b in zip(self.starts, self.starts[1:]))
            and self.starts[-1] < self.n_layers
        )
        if not ok:
            raise UsageError(
                f"bad stage starts {list(self.starts)} for {self.n_layers} layers: they must "
                f"begin at 0, increase strictly, and stay below {self.n_layers}"
            )

    @property
    def stages(self) -> int:
        return len(self.starts)

    def ranges(self) -> list[range]:
        """The layer indices of every stage."""
        ends = (*self.starts[1:], self.n_layers)
        return [range(a, b) for a, b in zip(self.starts, ends)]

    def costs(self, layer_costs: Sequence[float]) -> list[float]:
        """The total cost of each stage."""
        return [float(sum(layer_costs[i] for i in r)) for r in self.ranges()]


def _check_counts(n_layers: int, stages: int) -> None:
    if stages < 1:
        raise UsageError(f"stages must be >= 1, got {stages}")
    if n_layers < stages:
        raise UsageError(
            f"cannot cut {n_layers} layer(s) into {stages} stages: every stage needs at least "
            f"one layer; use at most {n_layers} stages"
        )


def explicit_split(n_layers: int, stages: int, cuts: Sequence[int]) -> Split:
    """Cut at ``cuts``: the index of the first layer of stages 1..P-1 (so P-1 numbers)."""
    _check_counts(n_layers, stages)
    cuts = list(cuts)
    if len(cuts) != stages - 1:
        raise UsageError(
            f"split={cuts} names {len(cuts)} cut point(s); {stages} stages need {stages - 1} "
            f"(the index of the first layer of each stage after the first)"
        )
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in cuts):
        raise UsageError(f"split points must be integers, got {cuts}")
    return Split((0, *cuts), n_layers)


def balanced_split(layer_costs: Sequence[float], stages: int) -> Split:
    """The contiguous split into ``stages`` that minimizes the costliest stage (exact DP)."""
    n = len(layer_costs)
    _check_counts(n, stages)
    if any(c < 0 for c in layer_costs):
        raise UsageError(f"layer costs must be >= 0, got {list(layer_costs)}")
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + float(c))

    def cost(i: int, j: int) -> float:
        return prefix[j] - prefix[i]

    # best[k][j]: (max stage cost, sum of squares) of layers[:j] in k stages; cut[k][j]: start
    # of the k-th stage in that best split
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(j - 1, k - 2, -1):  # later cuts first: ties keep the later one
                prev = best[k - 1][i]
                if prev == inf:
                    continue
                c = cost(i, j)
                cand = (max(prev[0], c), prev[1] + c * c)
                if cand < best[k][j]:
                    best[k][j], cut[k][j] = cand, i
    starts, j = [], n
    for k in range(stages, 0, -1):
        j = cut[k][j]
        starts.append(j)
    return Split(tuple(reversed(starts)), n)
