"""Spinning before sleeping: the budget rule, its env variable, the launcher's choice, the poll."""

from __future__ import annotations

import threading

import pytest
import torch
import zmq

from concord.comm import channel as channel_module
from concord.comm.channel import ClientChannel, poll_ready
from concord.comm.server_channel import ServerChannel
from concord.comm.spin import SPIN_ENV, SPIN_US, default_spin_us, spin_seconds
from concord.comm.wire import Codec, Message
from concord.errors import UsageError
from concord.launch.plan import LaunchConfig, plan

SECRET = b"s" * 32


@pytest.mark.parametrize(
    "processes, cores, spin",
    [(1, 1, SPIN_US), (2, 2, SPIN_US), (3, 2, 0), (6, 2, 0), (4, 16, SPIN_US), (1, None, 0)],
)
def test_spin_only_when_every_process_has_a_core(processes, cores, spin):
    assert default_spin_us(processes, cores) == spin


def test_spin_budget_refuses_no_processes():
    with pytest.raises(ValueError, match="processes must be >= 1, got 0"):
        default_spin_us(0, 4)


def test_spin_seconds_reads_the_env(monkeypatch):
    monkeypatch.delenv(SPIN_ENV, raising=False)
    assert spin_seconds() == 0.0
    monkeypatch.setenv(SPIN_ENV, "250")
    assert spin_seconds() == 250e-6
    monkeypatch.setenv(SPIN_ENV, "0")
    assert spin_seconds() == 0.0
    for bad in ("-1", "1.5", "fast"):
        monkeypatch.setenv(SPIN_ENV, bad)
        with pytest.raises(UsageError, match=f"CONCORD_SPIN_US must be .* got '{bad}'"):
            spin_seconds()


def _spins(config: LaunchConfig, cores, inherited=None) -> list[str]:
    specs = plan(config, 29512, "ab" * 32, inherited=inherited, python="py", cores=cores)
    return [spec.env[SPIN_ENV] for spec in specs]


def test_the_launcher_spins_only_where_the_node_has_a_core_per_process():
    one_and_one = LaunchConfig(program=("t.py",), workers=1, servers=1)
    assert _spins(one_and_one, cores=2) == [str(SPIN_US)] * 2
    assert _spins(one_and_one, cores=1) == ["0", "0"]
    assert _spins(one_and_one, cores=None) == ["0", "0"]  # unknown: block
    # 4 workers, 2 servers and the data server: 7 processes on node 0
    crowded = LaunchConfig(program=("t.py",), workers=4, servers=2, data_server="mnist")
    assert _spins(crowded, cores=6) == ["0"] * 7
    assert _spins(crowded, cores=7) == [str(SPIN_US)] * 7
    # node 1 starts its 4 workers only (servers and data server live on node 0)
    other = LaunchConfig(
        program=("t.py",), workers=4, servers=2, nnodes=2, node_rank=1, master_port=1, secret="s"
    )
    assert _spins(other, cores=4) == [str(SPIN_US)] * 4
    # the user's own setting wins, from the environment or from config.env
    assert _spins(crowded, cores=64, inherited={SPIN_ENV: "0"}) == ["0"] * 7
    mine = LaunchConfig(program=("t.py",), workers=4, servers=2, env={SPIN_ENV: "50"})
    assert _spins(mine, cores=1) == ["50"] * 6


class _Polls:
    """Records the timeouts poll_ready hands to zmq_poll and the yields between them."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, int]] = []
        real_poll, real_yield = zmq.zmq_poll, channel_module.os.sched_yield

        def poll(items, timeout):
            result = real_poll(items, timeout)
            self.calls.append(("poll", timeout))
            return result

        def sched_yield():
            self.calls.append(("yield", 0))
            real_yield()

        monkeypatch.setattr(channel_module.zmq, "zmq_poll", poll)
        monkeypatch.setattr(channel_module.os, "sched_yield", sched_yield)


def _pair():
    ctx = zmq.Context.instance()
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client.connect(f"tcp://127.0.0.1:{port}")
    return server, client


def test_a_message_that_comes_while_spinning_is_seen_without_sleeping(monkeypatch):
    server, client = _pair()
    polls = _Polls(monkeypatch)
    try:
        timer = threading.Timer(0.05, lambda: client.send(b"hello"))
        timer.start()
        # a spin far longer than the message takes: it must be found by a look, not a sleep
        assert poll_ready(server, 60_000, [], spin=30.0) == [server]
        timer.join()
        assert polls.calls[-1] == ("poll", 0)
        assert all(timeout == 0 for kind, timeout in polls.calls if kind == "poll")
        assert ("yield", 0) in polls.calls  # (it looked more than once before it came)
        assert server.recv_multipart()[1] == b"hello"
    finally:
        client.close(linger=0)
        server.close(linger=0)


def test_a_spin_that_finds_nothing_then_sleeps_for_the_rest_of_the_timeout(monkeypatch):
    server, client = _pair()
    polls = _Polls(monkeypatch)
    try:
        assert poll_ready(server, 200, [], spin=0.02) == []
        looks = [t for kind, t in polls.calls if kind == "poll"]
        assert looks[:-1] and set(looks[:-1]) == {0}  # looked without blocking, then
        assert 0 < looks[-1] <= 200 - 20  # slept for what was left of the 200 ms
        polls.calls.clear()
        assert poll_ready(server, 0, [], spin=0.02) == []  # no timeout: one look, no spin
        assert polls.calls == [("poll", 0)]
        polls.calls.clear()
        assert poll_ready(server, 30, [], spin=0.0) == []  # no spin: sleeps at once
        assert polls.calls == [("poll", 30)]
    finally:
        client.close(linger=0)
        server.close(linger=0)


def test_channels_take_the_spin_from_the_env_and_still_answer(monkeypatch):
    monkeypatch.setenv(SPIN_ENV, "2000")
    server = ServerChannel(Codec(SECRET), name="test server", local=True)
    client = ClientChannel(Codec(SECRET), server.address, "server 0", timeout=10)
    assert server.spin == client.spin == 0.002

    def serve(count: int) -> None:
        for _ in range(count):
            req = None
            while req is None:
                req = server.poll(timeout=5)
            server.reply(req.peer, Message("echo", tensors={"t": 2 * req.msg.tensors["t"]}))

    try:
        thread = threading.Thread(target=serve, args=(4,))
        thread.start()
        client.open_lanes(capacity=3 << 20)  # (a request the server answers in poll)
        for size in (10, 1 << 18, 10):  # small, 1 MB through the lane, small
            t = torch.randn(size)
            reply = client.request(Message("push", tensors={"t": t}))
            assert torch.equal(reply.tensors["t"], 2 * t)
        client.request(Message("push", tensors={"t": torch.zeros(1)}))
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        client.close()
        server.close()
