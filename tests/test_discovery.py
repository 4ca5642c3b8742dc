"""concord.comm.discovery: bind/advertise hosts and waiting for a published address."""

import threading

import pytest
import torch.distributed as dist

from concord.comm.discovery import Hosts, bind_hosts, publish_address, wait_for_address
from concord.errors import PeerTimeoutError


def test_loopback_stays_local(monkeypatch):
    monkeypatch.delenv("CONCORD_HOST", raising=False)
    for addr in ("127.0.0.1", "localhost", "::1"):
        assert bind_hosts(addr) == Hosts("127.0.0.1", "127.0.0.1")
    assert bind_hosts("localhost").url(5555) == "tcp://127.0.0.1:5555"


def test_concord_host_overrides(monkeypatch):
    monkeypatch.setenv("CONCORD_HOST", "10.1.2.3")
    assert bind_hosts("127.0.0.1") == Hosts("10.1.2.3", "10.1.2.3")


def test_published_address_is_returned():
    store = dist.HashStore()
    publish_address(store, "job/server/0/addr", "tcp://127.0.0.1:4000")
    assert wait_for_address(store, "job/server/0/addr", "server 0", 1.0) == "tcp://127.0.0.1:4000"


def test_waits_for_a_late_publisher():
    store = dist.HashStore()
    timer = threading.Timer(0.1, publish_address, (store, "k", "tcp://127.0.0.1:4001"))
    timer.start()
    try:
        assert wait_for_address(store, "k", "server 1", 10.0) == "tcp://127.0.0.1:4001"
    finally:
        timer.cancel()


def test_timeout_names_the_peer_key_and_hint():
    with pytest.raises(PeerTimeoutError, match=r"server 3 did not publish .*'a/b'.*0.1s; run X"):
        wait_for_address(dist.HashStore(), "a/b", "server 3", 0.1, hint="run X")
