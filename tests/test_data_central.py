"""The central data store: concurrent clients, bad requests, per-epoch partitions, the role."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading

import pytest
import torch
import zmq
from multiproc import job_env, run_workers

from concord.comm.lanes import unpack_frames
from concord.comm.wire import Codec, Message, WireError
from concord.data.central import CentralLoader, DataClient
from concord.data.dfs import write_shards
from concord.data.server import DataServer

N = 23


def synthetic(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i is x = [i, -i] (float32) and y = i."""
    ids = torch.arange(n)
    return torch.stack([ids, -ids], 1).float(), ids


@pytest.fixture
def server():
    secret = secrets.token_bytes(32)
    srv = DataServer(list(synthetic(N)), Codec(secret), max_batch=8)
    stop = threading.Event()
    thread = threading.Thread(target=srv.serve, args=(stop, 0.05), daemon=True)
    thread.start()
    yield srv, secret
    stop.set()
    thread.join(timeout=10)
    srv.close()


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    assert torch.equal(x[:, 0], y.float()) and torch.equal(x[:, 1], -y.float())


def test_concurrent_clients_get_their_rows(server):
    srv, secret = server
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            c = DataClient(srv.address, secret, timeout=30)
            gen = torch.Generator().manual_seed(k)
            wanted = [torch.randint(0, N, (5,), generator=gen) for _ in range(40)]
            for index, (x, y) in zip(wanted, c.fetch_all(wanted, depth=4)):
                assert torch.equal(y, index)
                check_batch(x, y)
            c.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert srv.served >= 6 * 40


@pytest.mark.parametrize("lanes", ["1", "0"])
def test_large_batches_come_through_shared_memory_on_one_host(monkeypatch, lanes):
    from concord.comm.lanes import Lane

    monkeypatch.setenv("CONCORD_LANES", lanes)
    secret = secrets.token_bytes(32)
    x = torch.randn(256, 784)  # a batch of 64 rows is 200 KB: lane-sized
    srv = DataServer([x, torch.arange(256)], Codec(secret), max_batch=64)
    stop = threading.Event()
    thread = threading.Thread(target=srv.serve, args=(stop, 0.05), daemon=True)
    thread.start()
    try:
        c = DataClient(srv.address, secret, timeout=30)
        wanted = [torch.randperm(256)[:64] for _ in range(6)]
        for index, (xb, yb) in zip(wanted, c.fetch_all(wanted, depth=3)):
            assert torch.equal(yb, index) and torch.equal(xb, x[index])
        c.close()
        used = lanes == "1" and Lane.available()
        assert (srv.channel.lane_bytes.sent >= 6 * 64 * 784 * 4) == used
        assert (srv.channel.lane_bytes.sent == 0) == (not used)
    finally:
        stop.set()
        thread.join(timeout=10)
        srv.close()


def test_bad_requests_get_error_replies_and_server_stays_up(server):
    srv, secret = server
    c = DataClient(srv.address, secret, timeout=30)
    bad = {
        r"out of range: \[23\]": torch.tensor([0, N]),
        r"out of range: \[-1\]": torch.tensor([-1]),
        "1-D int64": torch.tensor([[1, 2]]),
        "at most 8": torch.arange(9),
    }
    for what, index in bad.items():
        with pytest.raises(WireError, match=what):
            c.channel.request(Message("get", tensors={"index": index}))
    with pytest.raises(WireError, match="1-D int64"):
        c.channel.request(Message("get", tensors={"index": torch.tensor([1.0])}))
    with pytest.raises(WireError, match="needs an int64 tensor named 'index'"):
        c.channel.request(Message("get"))
    with pytest.raises(WireError, match="unknown op 'drop_table'"):
        c.channel.request(Message("drop_table"))
    # a stranger without the job secret, and plain garbage frames
    stranger = DataClient(srv.address, secrets.token_bytes(32), timeout=30)
    with pytest.raises(WireError, match="bad MAC"):  # its error reply fails auth too
        stranger.channel.request(Message("meta"))
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(srv.address)
    raw.send_multipart([b"garbage"])
    assert raw.poll(30_000), "no reply to garbage"
    reply = Codec(secret).decode(*unpack_frames(raw.recv_multipart(), None))
    assert reply.op == "error" and reply.meta["kind"] == "auth"  # an authenticated error reply
    raw.close(linger=0)
    # still serving, and right
    x, y = c.fetch(torch.tensor([3, 7]))
    assert y.tolist() == [3, 7]
    check_batch(x, y)
    assert srv.errors == 7
    assert srv.channel.rejected["auth"] >= 1 and sum(srv.channel.rejected.values()) >= 2
    c.close()
    stranger.close()


def epoch_ids(address: str, secret: bytes, world: int, epoch: int) -> list[list[int]]:
    out = []
    for rank in range(world):
        c = DataClient(address, secret, timeout=30)
        loader = CentralLoader(c, rank=rank, world=world, batch_size=3, seed=4, prefetch=2)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        for x, y in batches:
            check_batch(x, y)
        out.append([int(v) for _, y in batches for v in y])
        c.close()
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_epochs_partition_the_dataset(server, world):
    srv, secret = server
    seen = [epoch_ids(srv.address, secret, world, e) for e in range(3)]
    for parts in seen:
        assert sorted(i for p in parts for i in p) == list(range(N))
    assert seen[1] == epoch_ids(srv.address, secret, world, 1)
    assert seen[0] != seen[1] != seen[2]


def test_stopping_early_leaves_the_client_usable(server):
    srv, secret = server
    c = DataClient(srv.address, secret, timeout=30)
    stream = c.fetch_all([torch.tensor([i]) for i in range(10)], depth=4)
    assert next(stream)[1].tolist() == [0]
    stream.close()  # three requests were in flight: drained
    assert c.fetch(torch.tensor([9]))[1].tolist() == [9]
    c.close()


def _central_worker(epochs: int) -> list[list[int]]:
    import concord
    from concord.data.sources import make_loader

    ctx = concord.init(timeout=60)
    loader = make_loader("central", rank=ctx.rank, world=ctx.world_size, batch_size=4, seed=9)
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out.append([int(v) for _, y in loader for v in y])
    return out


@pytest.mark.timeout(180)
def test_data_server_role_serves_a_job(tmp_path):
    url = f"file://{tmp_path}/ds"
    write_shards(synthetic(N), url, sizes=[10, 3, 10])
    world = 3
    env = job_env(world) | {"CONCORD_TIMEOUT": "60"}
    server_env = os.environ | env | {"CONCORD_ROLE": "data", "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "concord.data.server", f"dfs:{url}"],
        env=server_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        results = run_workers(_central_worker, world, args=(2,), env=env, timeout=120)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"dfs:{url} ({N} samples) at tcp://127.0.0.1:" in out
    for epoch in range(2):
        parts = [r[epoch] for r in results]
        assert sorted(i for p in parts for i in p) == list(range(N))
    assert [r[0] for r in results] != [r[1] for r in results]


def test_central_delivers_the_same_batches_as_local(server):
    from torch.utils.data import TensorDataset

    from concord.data.loader import loader

    srv, secret = server
    for rank in range(3):
        local = loader(TensorDataset(*synthetic(N)), 4, rank=rank, world=3, seed=4)
        local.sampler.set_epoch(2)
        c = DataClient(srv.address, secret, timeout=30)
        central = CentralLoader(c, rank=rank, world=3, batch_size=4, seed=4)
        central.set_epoch(2)
        pairs = list(zip(local, central, strict=True))
        assert len(pairs) == len(central) == 2  # 23 samples over 3 workers: 8, 8, 7 -> 2 batches
        for (lx, ly), (cx, cy) in pairs:
            assert torch.equal(lx, cx) and torch.equal(ly, cy)
        c.close()


def test_missing_server_is_a_clear_error():
    import torch.distributed as dist

    from concord.comm.discovery import wait_for_address
    from concord.data.sources import make_loader
    from concord.errors import PeerTimeoutError, UsageError

    with pytest.raises(UsageError, match=r"call concord.init\(\)"):
        make_loader("central", rank=0, world=1, batch_size=4, seed=0)
    with pytest.raises(PeerTimeoutError, match="data server 0 did not publish its address"):
        wait_for_address(dist.HashStore(), "concord/0/data/0/addr", "data server 0", timeout=0.2)
