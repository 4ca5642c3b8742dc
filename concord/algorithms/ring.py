"""Bandwidth-optimal ring allreduce (sum): reduce-scatter, then all-gather, chunked and pipelined.

The flat buffer is cut into ``world`` segments; each segment into pieces of at most
``chunk`` elements. Reduce-scatter: worker ``r`` sends segment ``r`` to its right neighbour
and, for ``s = 0 .. N-2``, receives segment ``r-s-1`` from its left neighbour, adds its own
values, and forwards each piece as soon as it is summed (that is the pipelining: the next
worker starts on piece 1 while this one sums piece 2). After N-1 steps worker ``r`` owns the
full sum of segment ``r+1``. All-gather passes the finished segments around the ring the
same way, copying instead of adding. Each worker sends and receives 2(N-1)/N of the buffer.

The transport is a tiny :class:`Communicator` over a *wire buffer* that the left neighbour
can read (shared memory, or a copy in an in-memory fake):

- ``claim(a, b)``: wait until the right neighbour has finished reading my wire ``[a, b)``
  from its last post, and return it (writable); an allreduce first claims its whole region;
- ``post(a, b)``: my wire ``[a, b)`` is ready for the right neighbour;
- ``peek(a, b)``: wait for the left neighbour's next post (it is ``[a, b)``) and return it;
- ``release(a, b)``: I am done reading the left neighbour's ``[a, b)``.

Pieces are posted and peeked in the same order on every worker, so a transport needs only a
counter per direction. The input stays in the caller's accumulator: a hop writes
``acc + left`` straight into the wire (no copy of the input first), in ``acc``'s precision,
rounded once if the wire is narrower (compression). The result is the wire's values,
identical on all workers; the caller reads it from there (e.g. into ``.grad``).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Communicator(Protocol):
    """A worker's links to its ring neighbours over one wire buffer (see module docstring)."""

    rank: int
    world: int

    def claim(self, start: int, stop: int) -> torch.Tensor: ...

    def post(self, start: int, stop: int) -> None: ...

    def peek(self, start: int, stop: int) -> torch.Tensor: ...

    def release(self, start: int, stop: int) -> None: ...


def segments(numel: int, world: int) -> list[tuple[int, int]]:
    """``world`` contiguous ranges covering ``[0, numel)``, sizes differing by at most one."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    base, extra = divmod(numel, world)
    out, start = [], 0
    for i in range(world):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def pieces(start: int, stop: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into ranges of at most ``chunk`` elements (none if empty)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [(a, min(a + chunk, stop)) for a in range(start, stop, chunk)]


def ring_allreduce(comm: Communicator, acc: torch.Tensor, chunk: int) -> torch.Tensor:
    """Sum the 1-D tensor ``acc`` across the ring; return the wire, which holds the sum.

    ``acc`` is read, never written (unless it *is* ``comm.claim(0, n)``: zero-copy, the
    caller wrote its values into the wire). The wire's dtype may be lower than ``acc``'s
    (compression): each hop adds in ``acc``'s precision and rounds once for the wire. The
    returned tensor is valid until the next ``claim`` of this region.
    """
    n, world, rank = acc.numel(), comm.world, comm.rank
    if world == 1 or n == 0:
        return acc
    wire = comm.claim(0, n)  # first, for the whole region: the transport may rely on it
    zero_copy = wire.data_ptr() == acc.data_ptr() and wire.dtype == acc.dtype
    segs = segments(n, world)

    def seg_pieces(index: int) -> list[tuple[int, int]]:
        return pieces(*segs[index % world], chunk)

    for a, b in seg_pieces(rank):  # reduce-scatter, step 0: my own segment as it is
        if not zero_copy:
            comm.claim(a, b).copy_(acc[a:b])
        comm.post(a, b)
    for step in range(world - 1):
        for a, b in seg_pieces(rank - step - 1):
            mine = comm.claim(a, b)
            torch.add(acc[a:b], comm.peek(a, b), out=mine)
            comm.release(a, b)
            comm.post(a, b)  # pipelined: forward each piece as soon as it is summed
    for step in range(world - 1):  # all-gather: pass the finished segments on
        for a, b in seg_pieces(rank - step):
            comm.claim(a, b).copy_(comm.peek(a, b))
            comm.release(a, b)
            if step < world - 2:
                comm.post(a, b)
    return wire
