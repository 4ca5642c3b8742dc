"""Wire codec and zmq channels: round trips, every rejection, and a server that keeps serving."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concord.comm.channel import ClientChannel
from concord.comm.lanes import socket_frames, unpack_frames
from concord.comm.server_channel import ServerChannel
from concord.comm.wire import (
    DTYPES,
    HMAC_BYTES,
    MAC_BYTES,
    PROTOCOL_VERSION,
    Codec,
    LaneRef,
    Message,
    WireError,
    compute_mac,
    verify_mac,
)
from concord.errors import PeerTimeoutError, ProtocolError

MB = 1 << 20
SECRET = bytes(range(32))
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(-100, 100, shape, generator=gen)
    return raw.to(dtype) if dtype != torch.bool else raw > 0


def _sign(header: dict, buffers: list[bytes]) -> list[bytes]:
    """Frames for a hand-built header, correctly authenticated (tests a post-MAC check)."""
    raw = json.dumps(header).encode()
    return [compute_mac(SECRET, raw, buffers), raw, *buffers]


def _header(**over) -> dict:
    head = {"version": PROTOCOL_VERSION, "op": "push", "worker": 0, "step": 0, "meta": {}}
    head["buffers"] = [{"key": "w", "dtype": "float32", "shape": [2, 2], "chunks": 1}]
    head.update(over)
    return head


# -- codec ----------------------------------------------------------------------------------
@FUZZ
@given(
    dtypes=st.lists(st.sampled_from(sorted(DTYPES)), min_size=0, max_size=4),
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
    chunk=st.integers(1, 64),
    seed=st.integers(0, 2**16),
)
def test_round_trip_keeps_every_dtype_shape_and_value(dtypes, shape, chunk, seed):
    codec = Codec(SECRET, chunk_bytes=chunk)
    tensors = {f"t{i}": _tensor(DTYPES[d], tuple(shape), seed + i) for i, d in enumerate(dtypes)}
    msg = Message("push", worker=3, step=7, meta={"lr": [0.1, None], "s": "x"}, tensors=tensors)
    frames = [bytes(f) for f in codec.encode(msg)]
    got = codec.decode(frames)
    assert (got.op, got.worker, got.step, got.meta) == ("push", 3, 7, msg.meta)
    assert list(got.tensors) == list(tensors)
    for key, tensor in tensors.items():
        assert got.tensors[key].dtype == tensor.dtype
        assert torch.equal(got.tensors[key], tensor)


def test_large_tensor_is_chunked_and_reassembled():
    codec = Codec(SECRET, chunk_bytes=1000)
    big = torch.arange(1000, dtype=torch.float64)  # 8000 bytes -> 8 frames
    frames = codec.encode(Message("x", tensors={"big": big, "small": torch.ones(3)}))
    assert len(frames) == 2 + 8 + 1
    assert torch.equal(codec.decode(frames).tensors["big"], big)


def test_non_contiguous_tensor_is_sent_by_value():
    codec = Codec(SECRET)
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(codec.decode(codec.encode(Message("x", tensors={"t": t}))).tensors["t"], t)


@FUZZ
@given(data=st.data())
def test_any_flipped_byte_fails_the_mac(data):
    codec = Codec(SECRET, chunk_bytes=16)
    msg = Message("push", tensors={"a": torch.arange(10.0), "b": torch.ones(2, dtype=torch.int8)})
    frames = [bytearray(bytes(f)) for f in codec.encode(msg)]
    index = data.draw(st.integers(0, len(frames) - 1))
    pos = data.draw(st.integers(0, len(frames[index]) - 1))
    frames[index][pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(WireError) as err:
        codec.decode([bytes(f) for f in frames])
    assert err.value.kind == "auth"


def test_big_frame_is_authenticated_and_decoded_in_place():
    codec = Codec(SECRET)
    big = torch.arange(3 * MB // 4 + 5, dtype=torch.float32)  # 3 MiB + 20 bytes
    frames = [bytearray(bytes(f)) for f in codec.encode(Message("x", tensors={"big": big}))]
    assert len(frames) == 3  # mac, header, one frame: the tensor is not chunked
    got = codec.decode(frames).tensors["big"]
    assert torch.equal(got, big)
    got[0] = -1.0  # the decoded tensor is the received frame's memory, not a copy
    assert frames[2][:4] == bytes(torch.tensor([-1.0]).numpy())
    frames[2][:4] = bytes(big[:1].numpy())
    frames[2][2 * MB + 7] ^= 1  # one bit deep inside the frame
    with pytest.raises(WireError, match="bad MAC"):
        codec.decode(frames)


def test_mac_binds_frame_boundaries():
    header, nonce = b"{}", bytes(range(16))

    def mac(buffers):
        return compute_mac(SECRET, header, buffers, nonce)

    assert mac([b"ab", b"c"]) != mac([b"a", b"bc"])
    assert mac([b"abc"]) != mac([b"abc", b""])
    assert verify_mac(SECRET, mac([b"abc"]), header, [b"abc"])
    assert not verify_mac(SECRET, mac([b"abc"]), header, [b"abd"])


def test_mac_binds_a_lane_frame_by_its_place():
    header, nonce = b"{}", bytes(range(16))

    def mac(buffers):
        return compute_mac(SECRET, header, buffers, nonce)

    ref = LaneRef(shared=False, position=64, nbytes=8)
    signed = mac([b"x", ref])
    assert verify_mac(SECRET, signed, header, [b"x", LaneRef(False, 64, 8)])
    others = [LaneRef(True, 64, 8), LaneRef(False, 128, 8), LaneRef(False, 64, 16)]
    others += [ref.summary(), bytes(8)]  # (not the same as frames with those bytes)
    assert all(not verify_mac(SECRET, signed, header, [b"x", o]) for o in others)
    for bad in (LaneRef(False, -1, 8), LaneRef(False, 0, 1 << 63)):
        with pytest.raises(ValueError, match="out of range"):
            mac([bad])


def _hmac_tag(header: bytes, buffers: list, nonce: bytes) -> bytes:
    """The small-message MAC, computed here from the module docstring's formula."""
    data = [b"concord-wire/3 hmac all", nonce, (1 + len(buffers)).to_bytes(8, "little")]
    for frame in [header, *buffers]:
        if isinstance(frame, LaneRef):
            data.append(frame.summary())
        else:
            data += [len(frame).to_bytes(8, "little"), frame]
    return nonce + hmac.new(SECRET, b"".join(data), hashlib.sha256).digest()[:16]


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_small_messages_take_one_hmac_and_larger_ones_the_gmac(extra):
    header, nonce = b'{"op":"x"}', bytes(range(16, 32))
    payload = bytes(HMAC_BYTES - len(header) + extra)  # header + payload: HMAC_BYTES + extra
    lane = LaneRef(shared=False, position=128, nbytes=1 << 20)  # (its bytes are not hashed)
    for buffers in ([payload], [payload, lane]):
        signed = compute_mac(SECRET, header, buffers, nonce)
        assert (signed == _hmac_tag(header, buffers, nonce)) == (extra <= 0)
        assert verify_mac(SECRET, signed, header, buffers)
        flipped = bytes([payload[0] ^ 1]) + payload[1:]
        assert not verify_mac(SECRET, signed, header, [flipped, *buffers[1:]])
        assert not verify_mac(SECRET, signed, header + b" ", buffers)
        assert not verify_mac(b"another secret, 32 bytes long...", signed, header, buffers)
        if extra > 0:  # the sizes pick the scheme: a larger message's HMAC tag is refused
            assert not verify_mac(SECRET, _hmac_tag(header, buffers, nonce), header, buffers)


def test_mac_key_is_fresh_per_message_and_tied_to_the_secret():
    header, buffers = b"{}", [b"payload"]
    first, second = (compute_mac(SECRET, header, buffers) for _ in range(2))
    assert first[:16] != second[:16] and first[16:] != second[16:]  # one-time keys differ
    assert verify_mac(SECRET, first, header, buffers)
    assert verify_mac(SECRET, second, header, buffers)
    assert not verify_mac(b"another secret, 32 bytes long...", first, header, buffers)
    swapped = second[:16] + first[16:]  # a tag is valid only under its own nonce's key
    assert not verify_mac(SECRET, swapped, header, buffers)


@FUZZ
@given(junk=st.lists(st.binary(max_size=80), min_size=0, max_size=5))
def test_random_frames_are_rejected_never_parsed(junk):
    with pytest.raises(WireError) as err:
        Codec(SECRET).decode(junk)
    assert err.value.kind in {"frames", "auth"}


def test_other_secret_is_rejected():
    frames = Codec(b"x" * 32).encode(Message("pull"))
    with pytest.raises(WireError, match="bad MAC"):
        Codec(SECRET).decode(frames)


def test_wrong_version_is_rejected_after_the_mac():
    frames = _sign(_header(version=PROTOCOL_VERSION + 1), [bytes(16)])
    wanted = f"protocol version {PROTOCOL_VERSION + 1}, expected {PROTOCOL_VERSION}"
    with pytest.raises(WireError, match=wanted) as err:
        Codec(SECRET).decode(frames)
    assert err.value.kind == "version"


@pytest.mark.parametrize(
    ("buffers", "word"), [([], "truncated"), ([bytes(16), bytes(16)], "extra")]
)
def test_truncated_or_extra_frames_are_rejected(buffers, word):
    with pytest.raises(WireError, match=word) as err:
        Codec(SECRET).decode(_sign(_header(), buffers))
    assert err.value.kind == "frames"


def test_dropping_a_frame_in_transit_fails_the_mac():
    frames = Codec(SECRET).encode(Message("x", tensors={"a": torch.ones(2), "b": torch.ones(2)}))
    with pytest.raises(WireError, match="bad MAC"):
        Codec(SECRET).decode(frames[:-1])


@pytest.mark.parametrize(
    ("entry", "kind"),
    [
        ({"dtype": "complex64"}, "dtype"),
        ({"dtype": "object"}, "dtype"),
        ({"shape": [3, 2]}, "shape"),  # 24 bytes declared, 16 sent
        ({"shape": [-4]}, "shape"),
        ({"shape": "4"}, "shape"),
        ({"chunks": 0}, "header"),
        ({"key": 5}, "header"),
    ],
)
def test_wrong_dtype_or_shape_is_rejected(entry, kind):
    buf = {"key": "w", "dtype": "float32", "shape": [2, 2], "chunks": 1} | entry
    with pytest.raises(WireError) as err:
        Codec(SECRET).decode(_sign(_header(buffers=[buf]), [bytes(16)]))
    assert err.value.kind == kind


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({"version": 1}).encode(),
        json.dumps(_header(op="")).encode(),
        json.dumps(_header(worker="0")).encode(),
        json.dumps(_header(meta=[])).encode(),
        b"\xff\xfe{}",  # not UTF-8
        b"[" * 100_000,  # deeper than the JSON parser recurses
    ],
)
def test_malformed_header_is_rejected(header):
    frames = [compute_mac(SECRET, header, [bytes(16)]), header, bytes(16)]
    with pytest.raises(WireError) as err:
        Codec(SECRET).decode(frames)
    assert err.value.kind in {"header", "version"}


def test_oversize_is_rejected_on_both_ends():
    small = Codec(SECRET, max_bytes=100)
    with pytest.raises(WireError, match="101 bytes > 100"):
        small.encode(Message("x", tensors={"a": torch.zeros(101, dtype=torch.uint8)}))
    frames = Codec(SECRET).encode(Message("x", tensors={"a": torch.zeros(101, dtype=torch.uint8)}))
    with pytest.raises(WireError) as err:
        small.decode(frames)
    assert err.value.kind == "oversize"


def test_short_secret_and_gpu_free_checks():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Codec(b"short")
    with pytest.raises(TypeError, match="dtype"):
        Codec(SECRET).encode(Message("x", tensors={"c": torch.zeros(2, dtype=torch.complex64)}))


# -- channels -------------------------------------------------------------------------------
@pytest.fixture
def server():
    chan = ServerChannel(Codec(SECRET, max_bytes=1 << 16, chunk_bytes=1024), name="test server")
    yield chan
    chan.close()


def _client(server: ServerChannel, secret: bytes = SECRET, timeout: float = 10) -> ClientChannel:
    return ClientChannel(Codec(secret, chunk_bytes=1024), server.address, "server 0", timeout)


def _serve_one(server: ServerChannel) -> Message:
    """Echo one good request back with its tensors doubled; return it."""
    req = server.poll(timeout=10)
    assert req is not None
    doubled = {k: v * 2 for k, v in req.msg.tensors.items()}
    server.reply(req.peer, Message("echo", step=req.msg.step + 1, tensors=doubled))
    return req.msg


def test_channel_request_reply_with_chunked_tensors(server):
    client = _client(server)
    t = torch.arange(3000, dtype=torch.float32)  # 12000 bytes: 12 chunks of 1024
    client.send(Message("push", worker=1, step=4, tensors={"t": t}))
    assert _serve_one(server).worker == 1
    reply = client.recv(awaiting="the echo")
    assert reply.step == 5 and torch.equal(reply.tensors["t"], t * 2)
    assert server.bytes_in > 12000 and client.bytes_in > 12000
    client.close()


def test_server_answers_bad_messages_and_keeps_serving(server):
    client = _client(server)
    raw = _context_socket(server)
    bad = [
        [b"\0" * MAC_BYTES, b"{}"],  # bad MAC
        _sign(_header(version=99), [bytes(16)]),  # wrong version
        _sign(_header(), []),  # truncated
        _sign(_header(), [bytes(16), bytes(8)]),  # extra frame
        _sign(_header(buffers=[{"key": "w", "dtype": "q", "shape": [], "chunks": 1}]), [b""]),
        _sign(_header(buffers=[]), [b"x" * 70000]),  # over the 64 KiB payload limit
    ]
    kinds = []
    for frames in bad:
        raw.send_multipart(socket_frames(frames))  # as a client puts them on the socket
        _pump(server, raw)
        reply = Codec(SECRET).decode(*unpack_frames(raw.recv_multipart(), None))
        assert reply.op == "error" and not reply.tensors
        kinds.append(reply.meta["kind"])
    assert kinds == ["auth", "version", "frames", "frames", "dtype", "oversize"]
    assert sum(server.rejected.values()) == len(bad)
    client.send(Message("push", tensors={"t": torch.ones(2)}))  # still serving good peers
    _serve_one(server)
    assert torch.equal(client.recv(awaiting="echo").tensors["t"], torch.full((2,), 2.0))
    raw.close(linger=0)
    client.close()


def test_unauthenticated_client_gets_no_data(server):
    intruder = _client(server, secret=b"y" * 32)
    intruder.send(Message("pull", tensors={"probe": torch.ones(1)}))
    _pump(server, intruder.socket)
    with pytest.raises(WireError) as err:  # the error reply is signed with a key it lacks
        intruder.recv(awaiting="params")
    assert err.value.kind == "auth"
    intruder.close()


def test_error_reply_raises_with_the_peer_named(server):
    client = _client(server)
    client.send(Message("pull"))
    req = server.poll(timeout=10)
    server.reply(req.peer, Message("error", meta={"kind": "shape", "error": "w is [2]"}))
    with pytest.raises(WireError, match=r"server 0 rejected the request \(shape\): w is \[2\]"):
        client.recv(awaiting="params")
    client.close()


def test_timeout_names_peer_and_what_was_awaited(server):
    client = _client(server, timeout=0.2)
    client.send(Message("pull"))
    with pytest.raises(PeerTimeoutError, match=r"server 0 at tcp://127\.0\.0\.1:\d+.*params v3"):
        client.recv(awaiting="params v3")
    with pytest.raises(ProtocolError, match="unusable"):
        client.send(Message("pull"))
    client.close()


def _pump(server: ServerChannel, client: zmq.Socket) -> None:
    """Run the server until the client has a reply; nothing may reach the application."""
    for _ in range(200):
        if client.poll(0):
            return
        assert server.poll(timeout=0.05) is None
    raise AssertionError("the server never answered")


def _context_socket(server: ServerChannel) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(server.address)
    return sock
