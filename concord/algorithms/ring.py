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
  from its last post, and return it (writable);
- ``post(a, b)``: my wire ``[a, b)`` is ready for the right neighbour;
- ``peek(a, b)``: wait for the left neighbour's next post (it is ``[a, b)``) and return it;
- ``release(a, b)``: I am done reading the left neighbour's ``[a, b)``.

Pieces are posted and peeked in the same order on every worker, so a transport needs only a
counter per direction. When the accumulator *is* the wire (same memory), the reduce is
zero-copy; otherwise (compression) the wire holds a lower-precision copy, sums are kept in
the accumulator's precision, and the result is the wire's values, identical on all workers.
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


def ring_allreduce(comm: Communicator, acc: torch.Tensor, chunk: int) -> None:
    """Sum the 1-D tensor ``acc`` across the ring, in place, with the schedule above.

    ``acc`` is either ``comm.claim(0, n)`` itself (zero-copy; the caller has written its
    values there) or a separate accumulator (then the wire may have another dtype).
    """
    n, world, rank = acc.numel(), comm.world, comm.rank
    if world == 1 or n == 0:
        return
    wire = comm.claim(0, n)
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
            left = comm.peek(a, b)
            if zero_copy:
                mine.add_(left)
            else:
                acc[a:b].add_(left)
                mine.copy_(acc[a:b])
            comm.release(a, b)
            comm.post(a, b)  # pipelined: forward each piece as soon as it is summed
    for step in range(world - 1):  # all-gather: pass the finished segments on
        for a, b in seg_pieces(rank - step):
            comm.claim(a, b).copy_(comm.peek(a, b))
            comm.release(a, b)
            if step < world - 2:
                comm.post(a, b)
    if not zero_copy:
        acc.copy_(wire)
