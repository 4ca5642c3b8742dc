"""The ring schedule, in one process over an in-memory fake Communicator (threads + queues)."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from concord.algorithms.ring import pieces, ring_allreduce, segments


class FakeComm:
    """Ring links as queues: a post copies the piece into the right neighbour's inbox."""

    def __init__(self, rank: int, world: int, inboxes: list[queue.Queue], wire: torch.Tensor):
        self.rank, self.world, self.inboxes, self.wire = rank, world, inboxes, wire
        self.log: list[tuple[str, int, int]] = []

    def claim(self, start: int, stop: int) -> torch.Tensor:
        return self.wire[start:stop]

    def post(self, start: int, stop: int) -> None:
        self.log.append(("post", start, stop))
        piece = self.wire[start:stop].clone()
        self.inboxes[(self.rank + 1) % self.world].put((start, stop, piece))

    def peek(self, start: int, stop: int) -> torch.Tensor:
        got_start, got_stop, piece = self.inboxes[self.rank].get(timeout=10)
        assert (got_start, got_stop) == (start, stop), "pieces arrived out of order"
        self.log.append(("peek", start, stop))
        return piece

    def release(self, start: int, stop: int) -> None:
        pass


def run_ring(inputs: list[torch.Tensor], chunk: int, wire_dtype=None) -> list[torch.Tensor]:
    """Run ring_allreduce on each input in its own thread; return the results by rank."""
    world = len(inputs)
    inboxes = [queue.Queue() for _ in range(world)]
    accs = [x.clone() for x in inputs]
    results: list = [None] * world
    errors = []

    def work(rank: int) -> None:
        try:
            if wire_dtype is None:
                comm = FakeComm(rank, world, inboxes, accs[rank])  # zero-copy: acc is the wire
            else:
                wire = torch.zeros(accs[rank].numel(), dtype=wire_dtype)
                comm = FakeComm(rank, world, inboxes, wire)
            results[rank] = ring_allreduce(comm, accs[rank], chunk)
            if wire_dtype is not None:
                assert torch.equal(accs[rank], inputs[rank])  # the input is only read
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors
    return results


def test_segments_and_pieces_by_hand():
    assert segments(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert segments(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert segments(0, 2) == [(0, 0), (0, 0)]
    assert pieces(4, 11, 3) == [(4, 7), (7, 10), (10, 11)]
    assert pieces(5, 5, 3) == []
    with pytest.raises(ValueError):
        pieces(0, 4, 0)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("numel", [0, 1, 7, 13])
@pytest.mark.parametrize("chunk", [1, 64])
def test_sum_by_hand(world, numel, chunk):
    # rank r holds (r + 1) * [1, 2, ..., numel]: the sum is (1 + .. + N) * [1, .., numel]
    base = torch.arange(1, numel + 1, dtype=torch.float64)
    out = run_ring([base * (r + 1) for r in range(world)], chunk)
    want = base * (world * (world + 1) // 2)
    for result in out:
        assert torch.equal(result, want)


def test_two_workers_schedule_by_hand():
    # N=2, 4 elements, chunk 2: segments [0,2) [2,4); rank 0 posts its segment 0, sums
    # segment 1 and posts it (it owns it), then receives the finished segment 0.
    inboxes = [queue.Queue(), queue.Queue()]
    comms = [FakeComm(r, 2, inboxes, torch.ones(4) * (r + 1)) for r in range(2)]
    threads = [threading.Thread(target=ring_allreduce, args=(c, c.wire, 2)) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert comms[0].log == [("post", 0, 2), ("peek", 2, 4), ("post", 2, 4), ("peek", 0, 2)]
    assert comms[1].log == [("post", 2, 4), ("peek", 0, 2), ("post", 0, 2), ("peek", 2, 4)]
    assert all(torch.equal(c.wire, torch.full((4,), 3.0)) for c in comms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_and_lower_precision_wire(dtype):
    # integers up to 256 are exact in bf16 (8 significant bits); every partial sum here is
    # at most 15 * 10 = 150, so the bf16 ring and the fp32-accumulator path must be exact
    base = torch.arange(16, dtype=dtype)
    want = base * 10
    assert all(torch.equal(o, want) for o in run_ring([base * (r + 1) for r in range(4)], 5))
    wire = torch.bfloat16 if dtype == torch.float32 else None
    out = run_ring([base.float() * (r + 1) for r in range(4)], 5, wire_dtype=wire)
    assert all(torch.equal(o.float(), want.float()) for o in out)


def test_compressed_results_identical_on_every_worker():
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(101, generator=gen) for _ in range(3)]
    out = run_ring(inputs, 8, wire_dtype=torch.float16)
    exact = sum(inputs)
    for o in out:
        assert torch.equal(o, out[0])  # replicas stay bit-identical
        assert o.dtype == torch.float16  # the result is the wire's values
        # fp16 keeps 11 bits; three roundings of sums of 3 values of size ~1
        torch.testing.assert_close(o.float(), exact, rtol=0, atol=3 * 4 * 2**-11)
