"""A parameter-server process holding one shard: ``python -m concord.strategies.ps.server``.

``concord run -n 4 --servers 2 train.py`` starts two of these next to the four workers, with
``CONCORD_ROLE=server``, ``RANK`` = server index, ``WORLD_SIZE`` = number of workers,
``CONCORD_SERVERS``, ``MASTER_ADDR``/``MASTER_PORT`` (the job's store), ``CONCORD_SECRET`` and
``CONCORD_TIMEOUT`` (and optionally ``CONCORD_SERVER_THREADS``, torch threads, default 1;
``CONCORD_LOCAL_SOCKETS=0``: no local datagram socket for same-host workers, see
:mod:`concord.comm.local`). The server binds a ZeroMQ ROUTER port, publishes
``tcp://host:port`` in the store under ``concord/<attempt>/server/<rank>/addr`` and serves
until every worker has said goodbye (or was lost); under ``concord run`` it serves until the
launcher stops it after the workers exited. It never runs user code.

The request loop itself (operations, sync rounds, staleness, deadlines, stats) is
:class:`concord.strategies.ps.shard_server.ShardServer`.

Log lines: ``stats: version=.. pushes=.. dropped=.. clipped=.. staleness={..} lead={..}``
every 30 s and at exit; ``lost worker N`` when a worker stops talking for the timeout;
``rejected`` for bad messages (they get an error reply; the server keeps serving).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import torch

from concord.comm.alloc import keep_freed_memory
from concord.comm.discovery import bind_hosts, publish_address
from concord.comm.rendezvous import read_env
from concord.comm.runtime import init
from concord.comm.server_channel import ServerChannel
from concord.comm.wire import Codec
from concord.strategies.ps.norms import NormExchange
from concord.strategies.ps.shard_server import ShardServer

log = logging.getLogger("concord.ps.server")


def main() -> int:
    """Run one server shard from the env contract; the exit code is the job's verdict."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # element-wise updates gain little from threads and oversubscribed cores hurt them badly
    torch.set_num_threads(int(os.environ.get("CONCORD_SERVER_THREADS", "1")))
    keep_freed_memory()  # reuse message buffers instead of page-faulting fresh ones
    ctx = init()
    if ctx.role != "server":
        log.error("concord.strategies.ps.server runs with CONCORD_ROLE=server, got %r", ctx.role)
        return 2
    hosts = bind_hosts(ctx.master_addr)
    # pushes are read in place from the lanes: every handler uses them before the next poll;
    # a sync round's reply is written once into a lane all same-host workers read
    chan = ServerChannel(
        Codec(ctx.secret),
        host=hosts.bind,
        name=f"server {ctx.rank}",
        lane_views=True,
        broadcast=True,
        local=os.environ.get("CONCORD_LOCAL_SOCKETS", "1") != "0",
    )
    address = hosts.url(chan.port)
    publish_address(ctx.store, f"{ctx.store_prefix}server/{ctx.rank}/addr", address)
    log.info(
        "server %d of %d: serving %d workers on %s", ctx.rank, ctx.servers, ctx.world_size, address
    )
    # under concord run (the launcher hosts the store) the launcher stops the servers once the
    # workers exited; started by hand (torchrun, srun, tests) a server exits when all are done
    exit_when_done = not read_env().agent_store
    norms = None
    if ctx.servers > 1:
        norms = NormExchange(ctx.store, ctx.store_prefix, ctx.rank, ctx.servers, ctx.timeout)
    try:
        server = ShardServer(chan, ctx.rank, ctx.world_size, ctx.timeout, exit_when_done, norms)
        return server.serve()
    finally:
        chan.close()


if __name__ == "__main__":
    sys.exit(main())
