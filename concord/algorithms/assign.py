"""Pure data-placement plans: balanced shard slices and per-epoch all-to-all exchange plans.

Two questions, answered without sockets or processes:

* DFS: given K shard files with their sample counts and this epoch's shard order, which
  (shard, start, stop) slices does worker ``rank`` of ``world`` read so that every worker
  gets the same number of samples (within one) and together they read each sample once?
* Peer-to-peer: given the global sample ids a worker holds now and next epoch's
  permutation, which samples go to which peer, and where does each received sample land?
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from concord.errors import ConcordError


@dataclass(frozen=True)
class ShardSlice:
    """Samples ``start:stop`` of shard file number ``shard``."""

    shard: int
    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"bad slice {self.start}:{self.stop} of shard {self.shard}")

    def __len__(self) -> int:
        return self.stop - self.start


def check_rank(rank: int, world: int, total: int = 0) -> None:
    """Reject a world below 1, a rank outside it, or a negative item count."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world {world}")
    if total < 0:
        raise ValueError(f"num_samples must be >= 0, got {total}")


def part_bounds(total: int, world: int, rank: int) -> range:
    """Worker ``rank``'s contiguous part of ``total`` items; sizes differ by at most one.

    The first ``total % world`` workers get one extra item.
    """
    check_rank(rank, world, total)
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def num_batches(samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches of ``batch_size`` in ``samples`` (the short last one counts unless dropped)."""
    return samples // batch_size if drop_last else -(-samples // batch_size)


def shard_slices(
    counts: Sequence[int], order: Sequence[int], world: int, rank: int
) -> list[ShardSlice]:
    """The shard slices worker ``rank`` reads when the shards are laid end to end in ``order``.

    The concatenated stream is cut into ``world`` contiguous parts balanced by sample count
    (see ``part_bounds``); a worker reads whole shards inside its part and at most two
    partial ones at its edges. Across ranks the slices cover every sample exactly once.
    """
    if sorted(order) != list(range(len(counts))):
        raise ValueError(f"order must be a permutation of 0..{len(counts) - 1}, got {order}")
    if any(c < 0 for c in counts):
        raise ValueError(f"shard sample counts must be >= 0, got {list(counts)}")
    part = part_bounds(sum(counts), world, rank)
    out: list[ShardSlice] = []
    offset = 0
    for shard in order:
        lo, hi = offset, offset + counts[shard]
        offset = hi
        start, stop = max(lo, part.start), min(hi, part.stop)
        if start < stop:
            out.append(ShardSlice(shard, start - lo, stop - lo))
        if offset >= part.stop:
            break
    return out


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] == i`` (perm is a permutation of 0..n-1)."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm), dtype=perm.dtype)
    return inv


def owned_ids(perm: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Global sample ids worker ``rank`` holds in an epoch with permutation ``perm``, in order.

    Matches ``concord.data.sampler.shard_indices``: every ``world``-th position from ``rank``.
    """
    return perm[rank::world]


@dataclass(frozen=True)
class SendPlan:
    """How a worker sends its held samples: rows in ``order``, ``counts[p]`` rows to peer p."""

    order: torch.Tensor
    counts: list[int]


def send_plan(held: torch.Tensor, next_inv: torch.Tensor, world: int) -> SendPlan:
    """Group the held sample ids by their owner next epoch (owner = position % world).

    ``next_inv`` is the inverse of next epoch's permutation. The sort is stable, so rows
    bound for one peer keep their current relative order.
    """
    dest = next_inv[held] % world
    order = torch.sort(dest, stable=True).indices
    counts = torch.bincount(dest, minlength=world).tolist()
    return SendPlan(order=order, counts=counts)


def receive_rows(received: torch.Tensor, next_inv: torch.Tensor, world: int) -> torch.Tensor:
    """Row index (in next epoch's local order) of each received sample id.

    Worker r holds next epoch's positions r, r+world, r+2*world, ... so the sample at
    global position p lands at local row p // world.
    """
    return torch.div(next_inv[received], world, rounding_mode="floor")


def check_complete(rows: torch.Tensor, expected: int, rank: int) -> None:
    """Raise if the received rows are not exactly 0..expected-1 (a broken exchange)."""
    if len(rows) != expected or not torch.equal(
        torch.sort(rows).values, torch.arange(expected, dtype=rows.dtype)
    ):
        raise ConcordError(
            f"worker {rank}: peer exchange delivered {len(rows)} samples, expected {expected} "
            "distinct ones; did every worker call set_epoch() with the same epoch and seed?"
        )
