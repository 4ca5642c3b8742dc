"""Finding servers: which host a server binds and publishes, and waiting for its address.

A server (a parameter-server shard, the data server) binds a ZeroMQ socket, publishes
``tcp://host:port`` under a key in the job's rendezvous store, and its clients wait for
that key::

    hosts = bind_hosts(ctx.master_addr)          # Hosts(bind="127.0.0.1", advertise="127.0.0.1")
    chan = ServerChannel(codec, host=hosts.bind)
    publish_address(ctx.store, key, hosts.url(chan.port))
    ...
    address = wait_for_address(ctx.store, key, peer="server 0", timeout=ctx.timeout)
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from concord.errors import PeerTimeoutError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Hosts:
    """The interface a server binds and the host its clients connect to."""

    bind: str
    advertise: str

    def url(self, port: int) -> str:
        """The address clients connect to: ``tcp://advertise:port``."""
        return f"tcp://{self.advertise}:{port}"


def bind_hosts(master_addr: str) -> Hosts:
    """Where to bind and what to advertise. ``CONCORD_HOST`` overrides both; loopback jobs
    stay on 127.0.0.1; otherwise bind every interface and advertise the one that routes to
    ``master_addr`` (found with a UDP socket that sends nothing)."""
    override = os.environ.get("CONCORD_HOST")
    if override:
        return Hosts(override, override)
    if master_addr in _LOOPBACK:
        return Hosts("127.0.0.1", "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((master_addr, 9))
        return Hosts("0.0.0.0", probe.getsockname()[0])


def publish_address(store: Any, key: str, address: str) -> None:
    """Publish a server's ``address`` under ``key`` in the rendezvous store."""
    store.set(key, address)


def wait_for_address(store: Any, key: str, peer: str, timeout: float, hint: str = "") -> str:
    """The address ``peer`` published under ``key``; PeerTimeoutError after ``timeout`` s.

    ``hint`` (how to start that peer) is appended to the timeout error.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not store.check([key]):
        if time.monotonic() > deadline:
            raise PeerTimeoutError(
                f"{peer} did not publish its address (store key {key!r}) within {timeout:g}s"
                + (f"; {hint}" if hint else "; did it start? check its log")
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    return store.get(key).decode()
