"""Peer-to-peer data sharing: each worker holds only its slice; peers reshuffle by all-to-all.

There is no central node. Epoch ``e`` has one global permutation ``perm_e`` of the sample
ids, drawn from ``(seed, e)`` exactly as ``concord.data.sampler.shard_indices`` draws it;
worker ``r`` owns the samples at positions ``r, r+world, ...`` of it. Between epochs every
worker sends each sample it holds straight to that sample's next owner with
``torch.distributed.all_to_all_single`` (gloo on CPU), so each epoch every worker trains on
a fresh random slice of the whole dataset while holding only ``~N/world`` samples::

    loader = P2PLoader.from_dataset(mnist("train"), rank=ctx.rank, world=ctx.world_size,
                                    batch_size=64, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)        # collective: every worker calls it with the same epoch
        for x, y in loader: ...
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from concord.algorithms.assign import (
    check_complete,
    inverse,
    num_batches,
    owned_ids,
    part_bounds,
    receive_rows,
    send_plan,
)
from concord.data.sampler import shard_indices
from concord.errors import UsageError

Batch = tuple[torch.Tensor, ...]


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The global sample order of ``epoch`` (same draw as ``ShardedSampler``)."""
    return torch.tensor(shard_indices(num_samples, 0, 1, seed, epoch, True, False))


class P2PLoader:
    """Batches from the samples this worker holds; ``set_epoch`` reshuffles them across peers.

    ``tensors`` are this worker's rows (same length), ``ids`` their global sample ids, and
    ``num_samples`` the dataset size. ``layout_epoch`` says which epoch's ownership the rows
    already follow (None: arbitrary, the first ``set_epoch`` moves them). ``set_epoch`` is a
    collective over ``group`` (default: the whole job) and must be called by every worker.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        ids: torch.Tensor,
        num_samples: int,
        *,
        rank: int,
        world: int,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        group: Any = None,
        layout_epoch: int | None = None,
    ) -> None:
        part_bounds(num_samples, world, rank)  # validates rank and world
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if any(len(t) != len(ids) for t in tensors):
            raise ValueError(f"{len(ids)} ids but tensor lengths {[len(t) for t in tensors]}")
        if world > 1 and not dist.is_initialized():
            raise UsageError(
                "p2p data exchange needs torch.distributed; call concord.init() first "
                "(and start the job with `concord run -n N`)"
            )
        if world > 1:
            got = (dist.get_rank(group), dist.get_world_size(group))
            if got != (rank, world):
                raise UsageError(
                    f"p2p data: rank {rank} of world {world} must be this process's rank and "
                    f"size in the exchange group, which are {got}; pass group= (a process group "
                    "of the data-parallel replicas) or use --data local | dfs:URL | central"
                )
        self.tensors = [t.contiguous() for t in tensors]
        self.ids = ids.to(torch.int64)
        self.num_samples, self.rank, self.world = num_samples, rank, world
        self.batch_size, self.seed, self.drop_last, self.group = batch_size, seed, drop_last, group
        self._layout = layout_epoch
        self.epoch = 0 if layout_epoch is None else layout_epoch
        #: bytes this worker sent to other workers in the last exchange / in all exchanges
        self.exchange_bytes = 0
        self.bytes_sent = 0

    @classmethod
    def from_dataset(
        cls, dataset: Any, *, rank: int, world: int, batch_size: int, seed: int = 0, **kw: Any
    ) -> P2PLoader:
        """Keep only epoch 0's slice of ``dataset`` (a TensorDataset or tensors) on this worker."""
        full = list(getattr(dataset, "tensors", dataset))
        n = len(full[0])
        part_bounds(n, world, rank)
        mine = owned_ids(epoch_permutation(n, seed, 0), world, rank)
        rows = [t[mine].clone() for t in full]
        return cls(
            rows, mine, n, rank=rank, world=world, batch_size=batch_size, seed=seed,
            layout_epoch=0, **kw,
        )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch``'s ownership (a no-op if the rows already follow it)."""
        self.epoch = epoch
        if self._layout != epoch:
            self._exchange(epoch)
            self._layout = epoch

    def _exchange(self, epoch: int) -> None:
        perm = epoch_permutation(self.num_samples, self.seed, epoch)
        inv = inverse(perm)
        want = len(owned_ids(perm, self.world, self.rank))
        if self.world == 1:
            rows = receive_rows(self.ids, inv, 1)
            check_complete(rows, want, self.rank)
            self._place(rows, self.ids, self.tensors, want)
            self.exchange_bytes = 0
            return
        plan = send_plan(self.ids, inv, self.world)
        send_counts = torch.tensor(plan.counts, dtype=torch.int64, device=self._device())
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        ins, outs = plan.counts, recv_counts.tolist()
        got_ids = self._all_to_all(self.ids[plan.order], ins, outs)
        got = [self._all_to_all(t[plan.order], ins, outs) for t in self.tensors]
        rows = receive_rows(got_ids, inv, self.world)
        check_complete(rows, want, self.rank)
        self._place(rows, got_ids, got, want)
        row_bytes = 8 + sum(math.prod(t.shape[1:]) * t.element_size() for t in self.tensors)
        moved = sum(c for p, c in enumerate(ins) if p != self.rank)
        self.exchange_bytes = moved * row_bytes + 8 * (self.world - 1)
        self.bytes_sent += self.exchange_bytes

    def _device(self) -> torch.device:
        """Where the collective's tensors must live: the GPU for nccl, else the CPU."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_to_all(self, send: torch.Tensor, ins: list[int], outs: list[int]) -> torch.Tensor:
        device = self._device()
        send = send.to(device).contiguous()
        out = send.new_empty((sum(outs), *send.shape[1:]))
        dist.all_to_all_single(out, send, outs, ins, group=self.group)
        return out.cpu()

    def _place(
        self, rows: torch.Tensor, ids: torch.Tensor, tensors: list[torch.Tensor], want: int
    ) -> None:
        self.ids = torch.empty(want, dtype=torch.int64)
        self.ids[rows] = ids
        placed = []
        for t in tensors:
            out = t.new_empty((want, *t.shape[1:]))
            out[rows] = t
            placed.append(out)
        self.tensors = placed

    def __len__(self) -> int:
        n = len(range(self.rank, self.num_samples, self.world))
        return num_batches(n, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        if self._layout is None:
            self.set_epoch(self.epoch)
        n = len(self.ids)
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            yield tuple(t[start : start + self.batch_size] for t in self.tensors)
