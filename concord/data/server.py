"""The central data store: one process loads a dataset once and serves batches by index.

Started by the launcher::

    concord run -n 4 --data-server mnist train.py     # workers use make_loader("central", ...)

which runs ``python -m concord.data.server mnist`` with ``CONCORD_ROLE=data``. The server
joins the job's rendezvous store, binds a ZeroMQ ROUTER socket (concord's authenticated wire:
every message authenticated, raw tensor frames, nothing unpickled), publishes its address under
``concord/<attempt>/data/0/addr`` and serves until SIGTERM/SIGINT.

Requests (``concord.comm.wire.Message``):

* ``meta`` -> ``meta`` reply with ``num_samples`` and the fields (name, dtype, shape);
* ``get`` with an int64 tensor ``index`` (1-D, at most ``max_batch`` entries, each in
  ``[0, num_samples)``) -> ``batch`` reply with one tensor per field, rows in index order.

A bad request (unknown op, missing or malformed index, index out of range, oversize,
garbage, bad MAC) gets an ``error`` reply and a log line; the server keeps serving.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import torch

from concord.comm.discovery import bind_hosts, publish_address
from concord.comm.server_channel import Request, ServerChannel
from concord.comm.wire import Codec, Message, error_message
from concord.data.central import ADDR_KEY

log = logging.getLogger("concord.data")

DEFAULT_MAX_BATCH = 1 << 16


def field_names(count: int) -> list[str]:
    """Default field names: ``x, y`` for (inputs, labels), else ``t0, t1, ...``."""
    return ["x", "y"] if count == 2 else [f"t{i}" for i in range(count)]


class DataServer:
    """Serves rows of ``tensors`` (equal length, CPU) over a ServerChannel.

    Use ``serve(stop)`` in a thread or the main loop; ``handle(msg)`` is the request logic.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        codec: Codec,
        *,
        names: Sequence[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_batch: int = DEFAULT_MAX_BATCH,
        name: str = "dataset",
    ) -> None:
        tensors = [t.detach().cpu().contiguous() for t in tensors]
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError(f"tensors must be non-empty, of equal length: {len(tensors)}")
        self.names = list(names) if names is not None else field_names(len(tensors))
        if len(self.names) != len(tensors):
            raise ValueError(f"{len(self.names)} names for {len(tensors)} tensors")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.tensors, self.max_batch, self.name = tensors, max_batch, name
        self.num_samples = len(tensors[0])
        self.channel = ServerChannel(codec, host=host, port=port, name="data server 0")
        self.served = 0
        self.errors = 0

    @property
    def address(self) -> str:
        return self.channel.address

    def info(self) -> dict[str, Any]:
        """What a ``meta`` reply carries."""
        fields = [
            {"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape[1:])}
            for n, t in zip(self.names, self.tensors)
        ]
        return {"name": self.name, "num_samples": self.num_samples, "fields": fields}

    def handle(self, msg: Message) -> Message:
        """The reply to one authenticated request (an ``error`` message for a bad one)."""
        req = msg.meta.get("req", -1)
        if msg.op == "meta":
            return Message("meta", meta=self.info() | {"req": req})
        if msg.op != "get":
            return error_message("op", f"unknown op {msg.op!r}; send 'meta' or 'get'", req=req)
        index = msg.tensors.get("index")
        problem = self._check_index(index)
        if problem:
            return error_message("request", problem, req=req)
        out = {n: t[index] for n, t in zip(self.names, self.tensors)}
        return Message("batch", meta={"req": req}, tensors=out)

    def _check_index(self, index: torch.Tensor | None) -> str | None:
        if index is None:
            return "a 'get' request needs an int64 tensor named 'index'"
        if index.dtype != torch.int64 or index.dim() != 1:
            shape = list(index.shape)
            return f"'index' must be a 1-D int64 tensor, got {index.dtype} of shape {shape}"
        if len(index) > self.max_batch:
            return f"asked for {len(index)} samples; at most {self.max_batch} per request"
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            bad = index[(index < 0) | (index >= self.num_samples)][:3].tolist()
            return f"index out of range: {bad} not in [0, {self.num_samples})"
        return None

    def serve_one(self, timeout: float) -> bool:
        """Answer one request if one arrives within ``timeout`` seconds; True if one did."""
        request: Request | None = self.channel.poll(timeout)
        if request is None:
            return False
        try:
            reply = self.handle(request.msg)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            log.exception("data server: request %r failed", request.msg.op)
            reply = error_message("internal", f"{type(exc).__name__}: {exc}")
        if reply.op == "error":
            self.errors += 1
            log.warning("data server: rejected %r: %s", request.msg.op, reply.meta["error"])
        else:
            self.served += 1
        self.channel.reply(request.peer, reply)
        return True

    def serve(self, stop: threading.Event, poll: float = 0.2) -> None:
        """Serve until ``stop`` is set (checked every ``poll`` seconds when idle)."""
        while not stop.is_set():
            self.serve_one(poll)

    def close(self) -> None:
        self.channel.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m concord.data.server NAME``: the data role of ``concord run --data-server``."""
    from concord.comm.runtime import init
    from concord.data.sources import NAMES, named_dataset

    parser = argparse.ArgumentParser(prog="python -m concord.data.server", description=__doc__)
    parser.add_argument("name", help=f"dataset to serve: {', '.join(NAMES)}")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    ctx = init()
    data = named_dataset(args.name)
    hosts = bind_hosts(ctx.master_addr)
    server = DataServer(
        data.tensors, Codec(ctx.secret), host=hosts.bind, max_batch=args.max_batch, name=args.name
    )
    address = hosts.url(server.channel.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    publish_address(ctx.store, ctx.store_prefix + ADDR_KEY.format(index=0), address)
    log.info("data server: %s (%d samples) at %s", args.name, server.num_samples, address)
    try:
        server.serve(stop)
    finally:
        log.info("data server: served %d batches, %d errors", server.served, server.errors)
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
