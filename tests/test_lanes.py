"""Shared-memory lanes: the ring, the frame substitution, and channels that use them."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from concord.comm.channel import ClientChannel
from concord.comm.lanes import Lane, LaneError, pack_frames, socket_frames, unpack_frames
from concord.comm.local import local_sockets_available
from concord.comm.server_channel import ServerChannel
from concord.comm.wire import Codec, LaneRef, Message, WireError
from concord.errors import PeerTimeoutError, ProtocolError

SECRET = bytes(range(32))
pytestmark = pytest.mark.skipif(not Lane.available(), reason="no shared-memory lanes here")


@pytest.fixture
def pair():
    writer = Lane.create(1024)
    reader = Lane.attach(writer.path, 1024)
    writer.unlink()
    yield writer, reader
    writer.close()
    reader.close()


def test_lane_round_trip_wraps_and_refuses_what_does_not_fit(pair):
    writer, reader = pair
    got = []
    for i in range(10):  # 300-byte frames start 64-aligned: the fourth skips a 64-byte tail
        frame = np.full(300, i, dtype=np.uint8)
        position = writer.put(frame)
        assert position is not None and position % 64 == 0 and position % 1024 + 300 <= 1024
        got.append(reader.take(position, 300))
    assert all((g == i).all() for i, g in enumerate(got))
    first, second, third = (writer.put(np.zeros(300, dtype=np.uint8)) for _ in range(3))
    assert writer.put(np.zeros(300, dtype=np.uint8)) is None  # full until the reader frees
    assert writer.put(np.zeros(1025, dtype=np.uint8)) is None  # larger than the lane
    reader.take(first, 300)
    assert writer.put(np.zeros(300, dtype=np.uint8)) is not None


def test_lane_rejects_descriptors_outside_what_was_written(pair):
    writer, reader = pair
    position = writer.put(np.ones(100, dtype=np.uint8))
    with pytest.raises(LaneError, match="never written"):
        reader.take(position, 200)
    with pytest.raises(LaneError, match="out of bounds"):
        reader.take(950, 100)
    reader.take(position, 100)
    with pytest.raises(LaneError, match="out of bounds"):  # taken already: behind the reader
        reader.take(position, 100)


def test_a_viewed_frame_keeps_its_space_until_released(pair):
    writer, reader = pair
    first = writer.put(np.full(600, 7, dtype=np.uint8))
    view = reader.view(first, 600)
    assert (view == 7).all() and view.base is not None  # in place, no copy
    assert writer.put(np.zeros(600, dtype=np.uint8)) is None  # still taken
    with pytest.raises(LaneError, match="out of bounds"):  # behind the reader now
        reader.view(first, 600)
    reader.release()
    assert writer.put(np.zeros(600, dtype=np.uint8)) is not None


def test_a_frame_built_in_reserved_space_is_sent_without_a_copy(pair):
    writer, reader = pair
    space = writer.reserve(300)
    space[:] = 5  # built in place
    before = writer.put(np.full(100, 1, dtype=np.uint8))  # claimed after: placed after
    position = writer.put(space)  # behind the last put: out of order, so copied
    assert position > before and (reader.view(before, 100) == 1).all()
    assert (reader.view(position, 300) == 5).all()
    reader.release()
    space = writer.reserve(300)
    space[:] = 9
    position = writer.put(space)
    assert (reader.view(position, 300) == 9).all()
    assert space.ctypes.data - writer._data.ctypes.data == position % 1024  # where it was built
    assert writer.reserve(701) is None  # the unread 300 bytes are still taken
    reader.release()
    assert writer.reserve(0) is None and writer.reserve(700) is not None
    assert writer.put(np.full(400, 2, dtype=np.uint8)) is None  # reserved counts as taken


def test_closing_a_lane_with_a_live_view_leaves_the_mapping_to_it():
    writer = Lane.create(1000)
    reader = Lane.attach(writer.path, 1000)
    writer.unlink()
    view = reader.view(writer.put(np.full(10, 3, dtype=np.uint8)), 10)
    reader.close()  # no BufferError: the mapping stays while the view lives
    reader.release()  # and a closed lane ignores a late release
    assert (view == 3).all()
    writer.close()


def test_attach_accepts_only_lane_files(tmp_path):
    with pytest.raises(ValueError, match="not a concord lane"):
        Lane.attach("/etc/passwd", 1000)
    with pytest.raises(ValueError, match="not a concord lane"):
        Lane.attach(str(tmp_path / "concord-lane-x"), 1000)


def _lane_map(head: bytes, mark: bytes) -> np.ndarray:
    """The (buffer index, lane position, bytes) triples of a lane message's head."""
    count = int.from_bytes(head[len(mark) : len(mark) + 8], "little")
    return np.frombuffer(head[len(mark) + 8 : len(mark) + 8 + 24 * count], np.int64).reshape(-1, 3)


def test_frames_through_a_lane_are_authenticated_by_their_place(pair, monkeypatch):
    import concord.comm.lanes as lanes

    monkeypatch.setattr(lanes, "MIN_FRAME_BYTES", 100)
    writer, reader = pair
    codec = Codec(SECRET)
    big, small = torch.arange(200, dtype=torch.float32), torch.ones(2)  # 800 and 8 bytes
    msg = Message("push", tensors={"big": big, "small": small})
    header, buffers = codec.body(msg)
    plain = pack_frames(codec, header, buffers, None)  # no lane: one head frame, then buffers
    assert len(plain) == 3 and plain[0].endswith(header) and plain[1:] == buffers
    frames, places = unpack_frames(plain, None)
    assert places == {} and codec.decode(frames).tensors.keys() == {"big", "small"}
    assert codec.decode(*unpack_frames(socket_frames(codec.encode(msg)), None)).op == "push"
    sent = pack_frames(codec, header, buffers, writer)
    assert len(sent) == 2 and sent[1] is buffers[1]  # the big buffer went into the lane
    assert sent[0].startswith(lanes.LANE_MARK) and sent[0].endswith(header)
    ((index, position, nbytes),) = _lane_map(sent[0], lanes.LANE_MARK)
    assert (index, nbytes) == (0, 800)
    frames, places = unpack_frames(sent, reader)
    assert places == {0: LaneRef(False, int(position), 800)}
    got = codec.decode(frames, places)
    assert torch.equal(got.tensors["big"], big) and torch.equal(got.tensors["small"], small)
    with pytest.raises(WireError) as err:  # the place is signed: the bytes alone do not pass
        codec.decode(frames)
    assert err.value.kind == "auth"
    with pytest.raises(LaneError, match="no lane"):
        unpack_frames(sent, None)


def test_a_lane_frame_moved_cut_or_relabelled_fails_the_mac(monkeypatch):
    import concord.comm.lanes as lanes

    monkeypatch.setattr(lanes, "MIN_FRAME_BYTES", 100)
    codec = Codec(SECRET)
    header, buffers = codec.body(Message("push", tensors={"w": torch.ones(50)}))  # 200 bytes
    mark = lanes.LANE_MARK
    for change in ("moved", "cut", "relabelled"):
        writer = Lane.create(4096)
        reader, shared = Lane.attach(writer.path, 4096), Lane.attach(writer.path, 4096)
        writer.unlink()
        try:
            head = pack_frames(codec, header, buffers, writer)[0]
            twin = pack_frames(codec, header, buffers, writer)[0]  # the same bytes, further on
            (index, position, nbytes), (_, later, _) = (
                _lane_map(head, mark)[0],
                _lane_map(twin, mark)[0],
            )
            assert later > position
            table = {
                "moved": [index, later, nbytes],  # (its twin: identical bytes, another place)
                "cut": [index, position, nbytes - 8],
                "relabelled": [index, position, nbytes],
            }[change]
            start = mark if change != "relabelled" else lanes.SHARED_MARK  # (the shared lane's)
            forged = start + head[len(mark) : len(mark) + 8] + np.array(table, np.int64).tobytes()
            forged += head[len(mark) + 32 :]
            frames, places = unpack_frames([forged], reader, shared=shared)
            with pytest.raises(WireError) as err:
                codec.decode(frames, places)
            assert err.value.kind == "auth", change
        finally:
            for lane in (writer, reader, shared):
                lane.close()


def test_lane_files_are_private_and_gone_once_mapped():
    lane = Lane.create(4096)
    try:
        assert os.stat(lane.path).st_mode & 0o777 == 0o600  # only this user's processes
        peer = Lane.attach(lane.path, 4096)
        lane.unlink()  # (as the client does once its server answered its lanes request)
        assert not os.path.exists(lane.path)
        peer.close()
    finally:
        lane.close()


@pytest.mark.parametrize(
    "count, triples, inline, why",
    [
        (0, [], 1, "malformed"),
        (3, [0, 0, 8], 1, "malformed"),  # 3 entries need 72 bytes; the head has 64 after the count
        (1, [3, 0, 8], 1, "out of order or past the end"),  # only buffers 0 and 1 exist
        (2, [0, 0, 8, 0, 8, 8], 0, "out of order"),
        (2, [1, 0, 8, 0, 8, 8], 0, "past the message's end"),  # buffer 0 inline: none is
        (1, [0, 1 << 40, 8], 1, "never written"),
        (1, [0, 1010, 20], 1, "out of bounds"),  # would run past the lane's end
    ],
)
def test_a_forged_lane_map_is_rejected(pair, count, triples, inline, why):
    import concord.comm.lanes as lanes

    pair[0].put(np.zeros(64, np.uint8))
    head = lanes.LANE_MARK + count.to_bytes(8, "little") + np.array(triples, np.int64).tobytes()
    with pytest.raises(LaneError, match=why):
        unpack_frames([head + bytes(40), *[b"inline"] * inline], pair[1])


def test_channel_moves_large_frames_through_lanes_and_falls_back_inline():
    server = ServerChannel(Codec(SECRET), name="test server")
    client = ClientChannel(Codec(SECRET), server.address, "server 0", timeout=10)
    try:
        server_loop = _Loop(server)
        assert client.open_lanes(capacity=3 << 20) is True
        up, down = client._lanes
        for n in (1 << 18, 1 << 20):  # 1 MB fits the 3 MB lane; 4 MB goes through the socket
            t = torch.randn(n)
            reply = client.request(Message("push", tensors={"t": t}), awaiting="echo")
            assert torch.equal(reply.tensors["t"], 2 * t)
        assert up.moved == down.moved == 1 << 20  # only the 1 MB message used the lanes
        assert client._local is None and server.local_messages == [0, 0]  # (local=False)
    finally:
        server_loop.stop()
        client.close()
        server.close()


def test_lane_space_keeps_half_the_lane_for_frames_copied_in_as_they_go():
    server = ServerChannel(Codec(SECRET), name="test server")
    client = ClientChannel(Codec(SECRET), server.address, "server 0", timeout=10)
    try:
        assert client.lane_space(1 << 20) is None  # no lanes yet
        loop = _Loop(server)
        assert client.open_lanes(capacity=3 << 20) is True
        assert client.lane_space(1 << 10) is None  # small frames go inline anyway
        space = client.lane_space(1 << 20)
        assert space is not None and space.nbytes == 1 << 20
        assert client.lane_space(1 << 20) is None  # 1 MB left free of 3 MB: less than half
        t = torch.frombuffer(space, dtype=torch.float32)
        t.copy_(torch.arange(1 << 18, dtype=torch.float32))
        reply = client.request(Message("push", tensors={"t": t}), awaiting="echo")
        assert torch.equal(reply.tensors["t"], 2 * torch.arange(1 << 18, dtype=torch.float32))
        assert client._lanes[0].moved == 1 << 20  # counted once, never copied
    finally:
        loop.stop()
        client.close()
        server.close()


def test_views_are_lane_memory_until_the_next_poll_and_parts_are_copied():
    server = ServerChannel(Codec(SECRET), name="test server", lane_views=True)
    client = ClientChannel(Codec(SECRET), server.address, "server 0", timeout=10)
    try:
        seen: list[tuple[bool, torch.Tensor]] = []
        loop = _Loop(server, seen)
        assert client.open_lanes(capacity=3 << 20) is True
        up, down = client._lanes
        t = torch.randn(1 << 18)  # 1 MB: one part, through the lane
        got: list[torch.Tensor] = []
        reply = client.request(Message("push", tensors={"t": t}), awaiting="echo")
        assert torch.equal(reply.tensors["t"], 2 * t)
        in_lane, value = seen[-1]
        assert in_lane and torch.equal(value, t)  # the server read it in place
        client.part_bytes = 1 << 20  # 2 MB in two parts: the server copies them
        t2 = torch.randn(1 << 19)
        client.send(Message("push", tensors={"a": t2[: 1 << 18], "b": t2[1 << 18 :]}))
        reply = client.recv("echo", on_part=lambda p: got.extend(p.tensors.values()), views=True)
        assert not reply.tensors and torch.equal(torch.cat(got), 2 * t2)
        assert not any(inside for inside, _ in seen[-2:])
        for _ in range(8):  # 8 x 1 MB through a 3 MB lane: space is freed as requests end
            client.request(Message("push", tensors={"t": t}), awaiting="echo")
        assert up.moved == down.moved == 11 << 20
        with pytest.raises(ValueError, match="needs on_part"):
            client.recv("echo", views=True)
    finally:
        loop.stop()
        client.close()
        server.close()


def test_no_room_for_lanes_means_the_socket(monkeypatch):
    from concord.errors import ConcordError

    def full(*args, **kwargs):
        raise ConcordError("cannot reserve 16777216 bytes of shared memory in /dev/shm")

    server = ServerChannel(Codec(SECRET), name="test server")
    client = ClientChannel(Codec(SECRET), server.address, "server 0", timeout=10)
    try:
        loop = _Loop(server)
        monkeypatch.setattr(Lane, "create", full)
        assert client.open_lanes() is False
        t = torch.ones(1 << 18)
        assert torch.equal(client.request(Message("push", tensors={"t": t})).tensors["t"], 2 * t)
    finally:
        loop.stop()
        client.close()
        server.close()


def test_offering_lanes_to_a_silent_server_is_a_timeout_naming_it():
    import zmq

    from concord.errors import PeerTimeoutError

    silent = zmq.Context.instance().socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    client = ClientChannel(Codec(SECRET), f"tcp://127.0.0.1:{port}", "server 3", timeout=0.3)
    try:
        with pytest.raises(PeerTimeoutError, match=r"server 3 .* \(awaiting lanes\)"):
            client.open_lanes(capacity=1 << 20)
    finally:
        client.close()
        silent.close(linger=0)


def test_server_refuses_lanes_it_cannot_map():
    server = ServerChannel(Codec(SECRET), name="test server")
    client = ClientChannel(Codec(SECRET), server.address, "server 0", timeout=10)
    try:
        loop = _Loop(server)
        meta = {"up": "/etc/passwd", "down": "/etc/passwd", "capacity": 10}
        reply = client.request(Message("lanes", meta=meta), awaiting="lanes")
        assert reply.meta["ok"] is False and "not a concord lane" in reply.meta["why"]
        t = torch.ones(1 << 18)  # and plain messages still work
        assert torch.equal(client.request(Message("push", tensors={"t": t})).tensors["t"], 2 * t)
    finally:
        loop.stop()
        client.close()
        server.close()


def test_a_shared_lane_reader_reports_to_its_own_lane_and_starts_at_the_writer():
    shared = Lane.create_shared(1024)
    first = shared.put(np.full(100, 1, dtype=np.uint8))
    up = Lane.create(1024)
    up.unlink()
    try:
        assert up.acked == -1 and not os.path.exists(shared.path)
        with pytest.raises(ValueError, match="not a shared lane path"):
            Lane.attach_shared(up.path, 1024, up, shared.token)
        with pytest.raises(ValueError, match="not the shared lane its server named"):
            Lane.attach_shared(shared.share_path, 1024, up, "00" * 16)
        assert up.acked == -1
        reader = Lane.attach_shared(shared.share_path, 1024, up, shared.token)
        assert up.acked == 100  # mapped, and nothing before its attach is for it
        with pytest.raises(LaneError, match="out of bounds"):
            reader.view(first, 100)
        second = shared.put(np.full(100, 2, dtype=np.uint8))
        assert (reader.view(second, 100) == 2).all()
        reader.release()
        assert up.acked == second + 100 and shared.room == 1024 - second - 100  # writer frees
        shared.free_to(up.acked)
        assert shared.room == 1024
        reader.close()
    finally:
        up.close()
        shared.close()


def test_a_reply_to_several_clients_is_written_once_to_the_shared_lane():
    server = ServerChannel(Codec(SECRET), name="test server", broadcast=True)
    server._shared = Lane.create_shared(3 << 20)  # small, to fill it
    clients = [ClientChannel(Codec(SECRET), server.address, f"c{i}", timeout=10) for i in range(3)]
    try:
        loop = _Loop(server)
        assert all(c.open_lanes(capacity=3 << 20) for c in clients)
        loop.stop()
        assert not os.path.exists(server._shared.path)  # unlinked: mapped via /proc/<pid>/fd
        peers = []
        for i, client in enumerate(clients):  # each says hello, so the server knows its id
            client.send(Message("hello", worker=i))
            peers.append(server.poll(timeout=5).peer)
        shared = server._shared

        def reply(value: float, to: list[int]) -> torch.Tensor:
            t = torch.full((1 << 17,), value)  # 512 KB
            server.reply_many([peers[i] for i in to], Message("echo", tensors={"t": t}))
            return t

        t = reply(1.0, [0, 1, 2])
        assert shared.moved == t.nbytes  # written once for three clients
        for client in clients:
            got = []
            client.recv(
                "echo", on_part=lambda p, got=got: got.append(p.tensors["t"].clone()), views=True
            )
            assert torch.equal(got[0], t)
        t = reply(2.0, [0, 1])  # client 1 does not read this one: its share stays taken
        assert torch.equal(clients[0].recv("echo").tensors["t"], t)
        for value in (3.0, 4.0, 5.0, 6.0, 7.0):  # to clients 0 and 2, until the lane is full
            t = reply(value, [0, 2])
            for i in (0, 2):
                assert torch.equal(clients[i].recv("echo").tensors["t"], t)
        assert shared.moved == 5 * t.nbytes  # 1.0 to 5.0; then the clients' own lanes
        assert sum(server._lanes[p][1].moved for p in (peers[0], peers[2])) == 4 * t.nbytes
        assert torch.equal(clients[1].recv("echo").tensors["t"], torch.full_like(t, 2.0))
        t = reply(8.0, [0, 1, 2])  # client 1 caught up: the shared lane is free again
        assert shared.moved == 6 * t.nbytes
        clients[2]._lanes[0]._counters[16] = -1  # as if it could not map the shared lane
        reply(9.0, [0, 2])
        assert shared.moved == 6 * t.nbytes
        for i, client in enumerate(clients):
            for value in (8.0, 9.0) if i != 1 else (8.0,):
                assert torch.equal(client.recv("echo").tensors["t"], torch.full_like(t, value))
    finally:
        for client in clients:
            client.close()
        server.close()


@pytest.mark.skipif(not local_sockets_available(), reason="abstract Unix sockets are Linux's")
def test_messages_in_lanes_travel_as_local_datagrams_and_the_rest_through_zmq():
    server = ServerChannel(Codec(SECRET), name="test server", local=True)
    client = ClientChannel(Codec(SECRET), server.address, "server 0", timeout=10)
    try:
        loop = _Loop(server)
        assert client.open_lanes(capacity=3 << 20) is True and client._local is not None
        t = torch.randn(1 << 18)  # 1 MB: in the lanes, so the message is its head alone
        assert torch.equal(client.request(Message("push", tensors={"t": t})).tensors["t"], 2 * t)
        assert loop.after(1).local_messages == [1, 1]
        small = torch.randn(100)  # small buffers go into the lanes too when that makes a datagram
        reply = client.request(Message("push", tensors={"t": small}))
        assert torch.equal(reply.tensors["t"], 2 * small) and loop.after(2).local_messages == [2, 2]
        assert client._lanes[0].moved == (1 << 20) + 400
        reply = client.request(Message("push", meta={"note": "x" * (70 << 10)}))  # head > 60 KiB
        assert reply.op == "echo" and loop.after(3).local_messages == [2, 3]  # (a small reply)
        client.part_bytes = server.part_bytes = 1 << 20  # two parts each way: all through zmq
        t2 = torch.randn(1 << 19)
        reply = client.request(Message("push", tensors={"a": t2[: 1 << 18], "b": t2[1 << 18 :]}))
        assert torch.equal(torch.cat([reply.tensors["a"], reply.tensors["b"]]), 2 * t2)
        assert loop.after(4).local_messages == [2, 3]
        assert client._lanes[0].moved == (3 << 20) + 400  # its large frames still used the lanes
        loop.stop()  # (the server's state belongs to its thread)
        # a server closes a live link only when its process ends: the client says so at once
        server._listener.drop(server._listener.fds()[1])
        with pytest.raises(PeerTimeoutError, match="the server exited or crashed"):
            client.request(Message("push", tensors={"t": t}))
        with pytest.raises(ProtocolError, match="unusable because its process ended"):
            client.request(Message("pull"))
    finally:
        loop.stop()
        client.close()
        server.close()


@pytest.mark.skipif(not local_sockets_available(), reason="abstract Unix sockets are Linux's")
@pytest.mark.parametrize("secret,kind", [(SECRET, "request"), (b"not the job secret", "auth")])
def test_a_local_connection_without_a_valid_hello_is_dropped(secret, kind):
    import socket

    server = ServerChannel(Codec(SECRET), name="test server", local=True)
    client = ClientChannel(Codec(SECRET), server.address, "server 0", timeout=10)
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        loop = _Loop(server)
        assert client.open_lanes(capacity=3 << 20) is True
        name = server._listener.sock.getsockname()
        stranger.settimeout(5)
        stranger.connect(name)
        server._listener._tokens["ab" * 16] = b"a peer that was offered lanes"
        token = "ab" * 16 if kind == "auth" else "00" * 16  # (a token never given out)
        hello = Message("local", meta={"token": token})
        stranger.send(socket_frames(Codec(secret).encode(hello))[0])
        assert stranger.recv(1024) == b""  # dropped, no answer
        assert dict(server.rejected) == {kind: 1}
        t = torch.randn(1 << 18)  # the real client is still served through its socket
        assert torch.equal(client.request(Message("push", tensors={"t": t})).tensors["t"], 2 * t)
        assert loop.after(1).local_messages == [1, 1]
    finally:
        stranger.close()
        loop.stop()
        client.close()
        server.close()


class _Loop:
    """Echo every request with its tensors doubled, on a thread; ``seen`` records, for each
    tensor received, whether it was lane memory and a copy of its value."""

    def __init__(self, server: ServerChannel, seen: list | None = None) -> None:
        import threading

        self.server, self.running, self.seen = server, True, seen
        self.served = 0  # replies sent so far (the server's counters are final for them)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            req = self.server.poll(timeout=0.05)
            if req is not None:
                if self.seen is not None:
                    lanes = [
                        (up._data.ctypes.data, up._data.nbytes)
                        for up, _ in self.server._lanes.values()
                    ]
                    for v in req.msg.tensors.values():  # (a copy may be mapped right after)
                        inside = any(a <= v.data_ptr() < a + n for a, n in lanes)
                        self.seen.append((inside, v.clone()))
                doubled = {k: 2 * v for k, v in req.msg.tensors.items()}
                self.server.reply(req.peer, Message("echo", tensors=doubled))
                self.served += 1

    def after(self, replies: int) -> ServerChannel:
        """The server, once its thread has finished sending ``replies`` replies (a client may
        get a reply before the server thread counts it)."""
        deadline = time.monotonic() + 5
        while self.served < replies:
            assert time.monotonic() < deadline, f"the server sent {self.served} of {replies}"
            time.sleep(0.001)
        return self.server

    def stop(self) -> None:
        self.running = False
        self.thread.join(timeout=5)
