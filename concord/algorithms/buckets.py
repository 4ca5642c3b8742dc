"""Bucket planning: group gradients into fused buffers in the order backward produces them.

Pure: the planner sees only sizes, element sizes and a grouping key per parameter (tensors of
different dtypes or devices never share a bucket). Buckets are filled in ``order`` (by
default the reverse of registration order, which is roughly the order backward makes the
gradients ready) and closed when they reach ``cap_bytes``; the first bucket may be smaller
(``first_cap_bytes``) so that communication starts early in backward, as in PyTorch DDP.

Each bucket's flat layout is ``[grad of slot 0 | grad of slot 1 | ... | presence]``: the
gradients end to end, then one presence flag per slot (1 if this worker has a gradient for
that parameter, else 0). After a sum-allreduce a flag above 0 means "some worker had a
gradient", which is how every worker agrees which parameters end the step with ``grad=None``
without an extra collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ParamSpec:
    """What the planner needs to know about one parameter."""

    numel: int
    element_size: int
    key: str = ""  # dtype/device: parameters with different keys never share a bucket


@dataclass(frozen=True)
class Slot:
    """One parameter's place in a bucket's flat buffer."""

    param: int  # index into the parameter list given to plan_buckets
    offset: int  # first element in the bucket's flat buffer
    numel: int


@dataclass(frozen=True)
class Bucket:
    """A group of gradients reduced as one flat buffer."""

    index: int
    key: str
    slots: tuple[Slot, ...]

    @property
    def grad_numel(self) -> int:
        """Elements taken by gradients (the presence flags follow them)."""
        return sum(slot.numel for slot in self.slots)

    @property
    def numel(self) -> int:
        """Length of the flat buffer: gradients plus one presence flag per slot."""
        return self.grad_numel + len(self.slots)


@dataclass(frozen=True)
class BucketPlan:
    """Buckets in launch order, and which bucket holds each parameter (None: not planned)."""

    buckets: tuple[Bucket, ...]
    bucket_of: tuple[int | None, ...]

    @property
    def max_numel(self) -> int:
        return max((b.numel for b in self.buckets), default=0)


def plan_buckets(
    specs: Sequence[ParamSpec],
    cap_bytes: int,
    first_cap_bytes: int | None = None,
    order: Sequence[int] | None = None,
) -> BucketPlan:
    """Group ``specs`` into buckets of at most ``cap_bytes`` (a single larger tensor gets its own).

    ``order`` lists the parameter indices to plan, in the order their gradients are expected
    to be ready (default: all of them, last first). Indices left out are not planned (their
    ``bucket_of`` is None), e.g. frozen parameters.
    """
    if cap_bytes <= 0:
        raise ValueError(f"cap_bytes must be positive, got {cap_bytes}")
    if first_cap_bytes is not None and first_cap_bytes <= 0:
        raise ValueError(f"first_cap_bytes must be positive, got {first_cap_bytes}")
    order = list(range(len(specs)))[::-1] if order is None else list(order)
    if len(set(order)) != len(order) or any(not 0 <= i < len(specs) for i in order):
        raise ValueError(f"order must list distinct indices in [0, {len(specs)}), got {order}")
    open_groups: dict[str, list[int]] = {}
    open_bytes: dict[str, int] = {}
    closed: list[tuple[str, list[int]]] = []
    for i in order:
        spec = specs[i]
        members = open_groups.setdefault(spec.key, [])
        members.append(i)
        open_bytes[spec.key] = open_bytes.get(spec.key, 0) + spec.numel * spec.element_size
        cap = first_cap_bytes if not closed and first_cap_bytes is not None else cap_bytes
        if open_bytes[spec.key] >= cap:
            closed.append((spec.key, members))
            del open_groups[spec.key], open_bytes[spec.key]
    closed.extend(open_groups.items())  # leftovers, in order of their first member
    closed.sort(key=lambda kv: order.index(kv[1][0]))
    buckets, bucket_of = [], [None] * len(specs)
    for index, (key, members) in enumerate(closed):
        slots, offset = [], 0
        for i in members:
            slots.append(Slot(param=i, offset=offset, numel=specs[i].numel))
            offset += specs[i].numel
            bucket_of[i] = index
        buckets.append(Bucket(index=index, key=key, slots=tuple(slots)))
    return BucketPlan(buckets=tuple(buckets), bucket_of=tuple(bucket_of))
