"""Workers' side of the central data store: fetch batches by index, several in flight.

Each epoch worker ``rank`` takes its slice of a seeded permutation of the server's indices
(``concord.data.sampler.shard_indices``: disjoint across workers, union = the dataset, new
each epoch) and asks the data server for one batch of rows per request, keeping
``prefetch`` requests in flight on its socket so that fetching overlaps training::

    loader = CentralLoader.from_job(rank=ctx.rank, world=ctx.world_size, batch_size=64)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader: ...

Start the server with ``concord run --data-server mnist ...`` (see ``concord.data.server``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from concord.algorithms.assign import num_batches
from concord.comm.channel import ClientChannel, lanes_wanted
from concord.comm.discovery import wait_for_address
from concord.comm.rendezvous import connect_store, read_env
from concord.comm.runtime import DEFAULT_TIMEOUT, Context, current
from concord.comm.wire import Codec, Message, WireError
from concord.data.sampler import ShardedSampler
from concord.errors import UsageError

PEER = "data server 0"
START_HINT = "start the job with `concord run --data-server mnist ...` and check its log"
#: the store key (after the attempt prefix) where data server ``index`` publishes its address
ADDR_KEY = "data/{index}/addr"
Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class DatasetInfo:
    """What the server holds: its name, sample count and field names."""

    name: str
    num_samples: int
    fields: tuple[str, ...]


def _job_store(ctx: Context, timeout: float) -> Any:
    """The job's TCPStore; a lone worker (HashStore) connects to the launcher's store."""
    if ctx.store is not None and not isinstance(ctx.store, dist.HashStore):
        return ctx.store
    if "MASTER_PORT" not in os.environ:
        raise UsageError(
            "the central data source needs a data server: run the job with "
            "`concord run -n N --data-server mnist ...`"
        )
    return connect_store(read_env(), timeout, host=False)


class DataClient:
    """One connection to the data server: ``info()``, ``fetch(index)``, pipelined fetches."""

    def __init__(self, address: str, secret: bytes, timeout: float | None = None) -> None:
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self.channel = ClientChannel(Codec(secret), address, peer=PEER, timeout=timeout)
        if lanes_wanted():  # same host as the server: batches come through /dev/shm
            self.channel.open_lanes()
        self._next = 0
        self._info: DatasetInfo | None = None

    @classmethod
    def from_job(cls, ctx: Context | None = None, timeout: float | None = None) -> DataClient:
        """Connect to the data server of the job this process joined with ``concord.init()``."""
        ctx = ctx or current()
        if ctx is None:
            raise UsageError("call concord.init() before connecting to the data server")
        timeout = ctx.timeout if timeout is None else timeout
        store = _job_store(ctx, timeout)
        key = ctx.store_prefix + ADDR_KEY.format(index=0)
        address = wait_for_address(store, key, PEER, timeout, START_HINT)
        return cls(address, ctx.secret, timeout)

    def info(self) -> DatasetInfo:
        """The served dataset's name, size and fields (asked once, then cached)."""
        if self._info is None:
            reply = self.channel.request(Message("meta"), awaiting="the dataset description")
            meta = reply.meta
            self._info = DatasetInfo(
                meta["name"], int(meta["num_samples"]), tuple(f["name"] for f in meta["fields"])
            )
        return self._info

    def _send(self, index: torch.Tensor) -> int:
        req = self._next
        self._next += 1
        msg = Message("get", meta={"req": req}, tensors={"index": index.to(torch.int64)})
        self.channel.send(msg)
        return req

    def _recv(self, req: int, count: int) -> Batch:
        reply = self.channel.recv(awaiting=f"batch request {req} ({count} samples)")
        got = reply.meta.get("req")
        if reply.op != "batch" or got != req:
            raise WireError("header", f"{PEER} answered request {got} ({reply.op}), expected {req}")
        fields = self.info().fields
        if set(reply.tensors) != set(fields):
            raise WireError("header", f"{PEER} sent fields {list(reply.tensors)}, not {fields}")
        return tuple(reply.tensors[f] for f in fields)

    def fetch(self, index: torch.Tensor) -> Batch:
        """The rows ``index`` of every field, in index order."""
        self.info()
        return self._recv(self._send(index), len(index))

    def fetch_all(self, batches: list[torch.Tensor], depth: int) -> Iterator[Batch]:
        """Fetch ``batches`` in order with up to ``depth`` requests in flight.

        Stopping early drains the replies still in flight so the next call starts clean.
        """
        self.info()
        pending: deque[tuple[int, int]] = deque()
        todo = iter(batches)
        try:
            for index in todo:
                pending.append((self._send(index), len(index)))
                if len(pending) >= max(depth, 1):
                    yield self._recv(*pending.popleft())
            while pending:
                yield self._recv(*pending.popleft())
        finally:
            while pending:
                self._recv(*pending.popleft())

    @property
    def bytes_received(self) -> int:
        return self.channel.bytes_in

    @property
    def bytes_sent(self) -> int:
        return self.channel.bytes_out

    def close(self) -> None:
        self.channel.close()


class CentralLoader:
    """Batches of worker ``rank``'s per-epoch shard, fetched from the data server."""

    def __init__(
        self,
        client: DataClient,
        *,
        rank: int,
        world: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        prefetch: int = 4,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.client, self.batch_size, self.prefetch = client, batch_size, prefetch
        self.drop_last = drop_last
        self.sampler = ShardedSampler(
            client.info().num_samples, rank, world, seed, shuffle, drop_last
        )

    @classmethod
    def from_job(
        cls, *, rank: int, world: int, batch_size: int, seed: int = 0, **kw: Any
    ) -> CentralLoader:
        """A loader on the current job's data server (see ``DataClient.from_job``)."""
        client = DataClient.from_job()
        return cls(client, rank=rank, world=world, batch_size=batch_size, seed=seed, **kw)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return num_batches(n, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        index = torch.tensor(self.sampler.indices(), dtype=torch.int64)
        stop = len(index) - len(index) % self.batch_size if self.drop_last else len(index)
        batches = [index[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]
        return self.client.fetch_all(batches, self.prefetch)

    @property
    def bytes_received(self) -> int:
        return self.client.bytes_received
