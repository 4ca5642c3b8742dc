"""ZeroMQ channels carrying :mod:`concord.comm.wire` messages: ROUTER server, DEALER client.

A :class:`ServerChannel` binds a ROUTER socket, hands out authenticated requests one at a time
(:meth:`ServerChannel.poll`) and replies to the peer that sent each. A bad message (bad MAC,
wrong version, malformed frames, oversize) never reaches the caller: it gets an error reply and
a log line, is counted in :attr:`ServerChannel.rejected`, and the server keeps serving.

A :class:`ClientChannel` connects a DEALER socket to one server. Replies come back in the
order requests were sent (one server loop per socket); every wait has a timeout whose
:class:`~concord.errors.PeerTimeoutError` names the peer and what was awaited. Tensors are
sent without copies (zmq keeps a reference until the bytes are on the socket); received
tensors share the received frames' memory. On one host a client may offer its server
shared-memory lanes (:mod:`concord.comm.lanes`) for the large frames; a receiver that uses
what it gets at once can read them in place (``ServerChannel(lane_views=True)``,
``ClientChannel.recv(views=True)``). A server made with ``local=True`` also offers those
clients a Unix datagram socket (Linux): a message whose buffers all went into lanes then
travels as one datagram (its head: MAC, header, lane map) instead of through ZeroMQ's I/O
threads and the TCP loopback; anything else still goes through the ZeroMQ socket. A client
has one request in flight at a time, and a multi-part message keeps to the ZeroMQ socket, so
messages cannot overtake each other across the two. Every datagram is authenticated like any
message; the socket's first one must carry the one-time token the server gave that client in
its (authenticated) lanes reply.

Example (the data server and the parameter servers use exactly this)::

    codec = Codec(secret)
    server = ServerChannel(codec, host="127.0.0.1")        # server.address: tcp://127.0.0.1:PORT
    client = ClientChannel(codec, server.address, peer="server 0", timeout=30)
    client.send(Message("ping"))
    req = server.poll(timeout=1.0)                          # Request(peer, msg, nbytes)
    server.reply(req.peer, Message("pong"))
    client.recv(awaiting="pong")
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import zmq

from concord.comm.lanes import LANE_BYTES, MIN_FRAME_BYTES, Lane, pack_frames, unpack_frames
from concord.comm.parts import PART_BYTES, PART_KEY, PartAssembler, split_message
from concord.comm.wire import (
    MAX_HEADER_BYTES,
    Codec,
    Message,
    WireError,
    error_message,
    raise_if_error,
)
from concord.errors import ConcordError, PeerTimeoutError, ProtocolError

log = logging.getLogger("concord.wire")
_LINGER_MS = 2000
LOCAL_DATAGRAM_BYTES = 60 << 10  # the largest message head sent as one local datagram
_MAX_STRANGERS = 32  # local connections that have not said hello yet


def _context() -> zmq.Context:
    return zmq.Context.instance()


@dataclass(frozen=True)
class Request:
    """An authenticated request: the sender's zmq identity, its message and its size."""

    peer: bytes
    msg: Message
    nbytes: int


class ServerChannel:
    """A bound ROUTER socket that receives authenticated requests and replies to them."""

    def __init__(
        self,
        codec: Codec,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "server",
        lane_views: bool = False,
        broadcast: bool = False,
        local: bool = False,
    ):
        self.codec = codec
        self.name = name
        self.lane_views = lane_views
        self.broadcast = broadcast
        self.local = local and local_sockets_available()
        self.socket = _context().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, _LINGER_MS)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.MAXMSGSIZE, codec.max_bytes + MAX_HEADER_BYTES)
        if port:
            self.socket.bind(f"tcp://{host}:{port}")
            self.port = port
        else:
            self.port = self.socket.bind_to_random_port(f"tcp://{host}")
        self.host = host
        self.part_bytes = PART_BYTES
        self._parts = PartAssembler(codec.max_bytes)
        self._ids = itertools.count()
        self._lanes: dict[bytes, tuple[Lane, Lane]] = {}  # peer -> (its up lane, down lane)
        self._held: list[Lane] = []  # lanes the last request's tensors are views of
        self._shared: Lane | None = None  # with broadcast: one lane every local peer reads
        self._sent_upto: dict[bytes, int] = {}  # peer -> end of its last shared-lane frame
        self._listener: socket.socket | None = None  # with local: the Unix datagram socket
        self._conns: dict[int, socket.socket] = {}  # fd -> accepted local connection
        self._conn_peer: dict[int, bytes] = {}  # fd -> the peer that said hello on it
        self._peer_conn: dict[bytes, socket.socket] = {}
        self._tokens: dict[str, bytes] = {}  # hello token -> the peer it was given to
        self.local_messages = [0, 0]  # requests in and replies out through local sockets
        self.rejected: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def address(self) -> str:
        """The ``tcp://host:port`` clients connect to."""
        return f"tcp://{self.host}:{self.port}"

    def poll(self, timeout: float) -> Request | None:
        """The next authenticated request, or None if none came within ``timeout`` seconds.

        Rejected messages are answered with an error reply and skipped; a multi-part message
        is returned once its last part is in. With ``lane_views``, the tensors of a one-part
        request that came through a lane are views of the lane, valid until the next poll
        (copy what must live longer).
        """
        for lane in self._held:  # the last request's views are dead now
            lane.release()
        self._held = []
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            source = self._wait(left_ms)
            if source is None:
                return None
            if source is self.socket:
                frames = self.socket.recv_multipart(copy=False)
                peer, body = frames[0].bytes, frames[1:]
            else:
                got = self._recv_local(source)
                if got is None:
                    if time.monotonic() >= deadline:
                        return None
                    continue
                peer, body = got
            try:
                lanes = self._lanes.get(peer)
                views = self.lane_views and lanes is not None
                body = unpack_frames(body, lanes[0] if lanes else None, copy=not views)
                self.bytes_in += sum(len(f) for f in body)  # lane bytes count too, as sent
                if views:
                    self._held.append(lanes[0])  # (also when decode fails: freed next poll)
                part = self.codec.decode(body)
                if views and PART_KEY in part.meta:  # the assembler keeps it past this poll
                    part = replace(part, tensors={k: t.clone() for k, t in part.tensors.items()})
                    lanes[0].release()
                msg = self._parts.add(peer, part)
                if msg is not None and msg.op == "lanes":
                    self._accept_lanes(peer, msg)
                    continue
                if msg is not None:
                    return Request(peer, msg, msg.nbytes)
                continue  # more parts are due: keep polling until the deadline
            except (WireError, ValueError) as exc:
                exc = _wire_error(exc)
                self._parts.drop(peer)
                self.rejected[exc.kind] += 1
                log.warning("%s: rejected a message from peer %s: %s", self.name, peer.hex(), exc)
                self.reply(peer, error_message(exc.kind, str(exc)))
            if time.monotonic() >= deadline:
                return None

    def _wait(self, timeout_ms: int) -> Any:
        """The ZeroMQ socket or a local connection's fd with something to read (accepting
        new local connections on the way), or None after ``timeout_ms``."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            fds = [] if self._listener is None else [self._listener.fileno(), *self._conns]
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            ready = _ready(self.socket, left_ms, fds)
            if not ready:
                return None
            if fds and fds[0] in ready:
                self._accept_local()
            for what in ready:
                if what is self.socket or what in self._conns:
                    return what

    def _accept_local(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        if len(self._conns) - len(self._conn_peer) >= _MAX_STRANGERS:
            conn.close()  # (only the job's clients get a token to say hello with)
            return
        conn.setblocking(False)
        self._conns[conn.fileno()] = conn

    def _recv_local(self, fd: int) -> tuple[bytes, list[Any]] | None:
        """(peer, frames) of the datagram waiting on local connection ``fd``; None for a
        hello, a closed connection or nothing to read."""
        data = _datagram(self._conns[fd])
        if data is None:
            return None
        peer = self._conn_peer.get(fd)
        if not data:
            self._drop_local(fd)
            return None
        if peer is None:
            self._hello(fd, data)
            return None
        self.local_messages[0] += 1
        return peer, [data]

    def _hello(self, fd: int, data: bytes) -> None:
        """The first datagram on a local connection: an authenticated ``local`` message with
        the token this server gave one peer; that peer's messages may then come this way."""
        conn = self._conns[fd]
        try:
            msg = self.codec.decode(unpack_frames([data], None))
            peer = self._tokens.pop(str(msg.meta.get("token")), None)
            if msg.op != "local" or peer is None:
                raise WireError("request", "a local connection must begin with a valid hello")
        except (WireError, ValueError) as exc:
            exc = _wire_error(exc)
            self.rejected[exc.kind] += 1
            log.warning("%s: rejected a local connection: %s", self.name, exc)
            self._drop_local(fd)
            return
        old = self._peer_conn.pop(peer, None)
        if old is not None:
            self._drop_local(old.fileno())
        self._conn_peer[fd] = peer
        self._peer_conn[peer] = conn
        head = pack_frames(self.codec.encode(Message("local", meta={"ok": True})), None)[0]
        try:
            conn.send(head)
        except OSError:
            self._drop_local(fd)

    def _drop_local(self, fd: int) -> None:
        conn = self._conns.pop(fd, None)
        peer = self._conn_peer.pop(fd, None)
        if peer is not None and self._peer_conn.get(peer) is conn:
            del self._peer_conn[peer]
        if conn is not None:
            conn.close()

    def _local_listener(self) -> socket.socket | None:
        """The Unix datagram socket local peers connect to (created on first use)."""
        if self.local and self._listener is None:
            try:
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                listener.bind("\0concord-" + secrets.token_hex(16))  # abstract: no file
                listener.listen(64)
                listener.setblocking(False)
            except OSError as exc:
                log.info("%s: no local sockets (%s)", self.name, exc)
                self.local = False
                return None
            self._listener = listener
        return self._listener

    def _send_local(self, peer: bytes, out: list[Any]) -> bool:
        """Send ``out`` (socket frames) to ``peer`` as one local datagram if it can go that
        way: it has a local connection, the message is its head alone (every buffer is in a
        lane) and small enough, and the datagram fits its socket's buffer now."""
        conn, datagram = self._peer_conn.get(peer), _as_datagram(out)
        if conn is None or datagram is None:
            return False
        try:
            conn.send(datagram)
        except BlockingIOError:  # it is not reading: ZeroMQ queues the message instead
            return False
        except OSError:  # it is gone
            self._drop_local(conn.fileno())
            return False
        self.local_messages[1] += 1
        return True

    def _accept_lanes(self, peer: bytes, msg: Message) -> None:
        """Map the shared-memory lanes a same-host client offers (op ``lanes``)."""
        try:
            capacity = int(msg.meta["capacity"])
            up = Lane.attach(str(msg.meta["up"]), capacity)
            down = Lane.attach(str(msg.meta["down"]), capacity)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            self.reply(peer, Message("lanes", meta={"ok": False, "why": str(exc)}))
            return
        for lane in self._lanes.pop(peer, ()):
            lane.close()
        self._lanes[peer] = (up, down)
        self._sent_upto.pop(peer, None)
        meta: dict[str, Any] = {"ok": True}
        listener = self._local_listener()
        if listener is not None:
            token = secrets.token_hex(16)
            self._tokens = {t: p for t, p in self._tokens.items() if p != peer}
            self._tokens[token] = peer
            meta |= {"local": listener.getsockname()[1:].decode(), "local_token": token}
        shared = self._shared_lane()
        if shared is not None:
            meta |= {
                "shared": shared.share_path,
                "shared_capacity": shared.capacity,
                "shared_token": shared.token,
            }
        self.reply(peer, Message("lanes", meta=meta))

    def _shared_lane(self) -> Lane | None:
        """The lane for replies to several same-host peers at once (created on first use)."""
        if self.broadcast and self._shared is None:
            try:
                self._shared = Lane.create_shared()
            except (ConcordError, OSError) as exc:
                log.info("%s: no shared lane for broadcast replies (%s)", self.name, exc)
                self.broadcast = False
        return self._shared

    def _shared_for(self, peers: list[bytes], nbytes: int) -> Lane | None:
        """The shared lane, if every one of ``peers`` reads it and it has room for ``nbytes``
        (once the space that no reader still needs is freed: a peer holds frames back only
        until it has freed all sent to it; one that was lost keeps its share, so the lane may
        fill, and then replies go through the peers' own lanes)."""
        shared = self._shared
        if shared is None or len(peers) < 2:
            return None
        acked = {peer: up.acked for peer, (up, _) in self._lanes.items()}  # (read once each)
        if any(acked.get(peer, -1) < 0 for peer in peers):
            return None
        needed = [ack for peer, ack in acked.items() if ack < self._sent_upto.get(peer, -1)]
        shared.free_to(min(needed, default=shared.written))
        return shared if shared.room >= 2 * nbytes else None  # (slack for the ring's tail)

    def has_lanes(self, peer: bytes) -> bool:
        """Whether ``peer`` took shared-memory lanes (its large reply frames are copied into
        them as they are sent)."""
        return peer in self._lanes

    @property
    def lane_bytes(self) -> tuple[int, int, int]:
        """Bytes received and sent through shared-memory lanes (part of bytes_in/out), and of
        those sent, the bytes written once into the shared lane for several peers."""
        lanes = self._lanes.values()
        shared = self._shared.moved if self._shared is not None else 0
        sent = sum(down.moved for _, down in lanes) + shared
        return sum(up.moved for up, _ in lanes), sent, shared

    def reply(self, peer: bytes, msg: Message, track: bool = False) -> zmq.MessageTracker | None:
        """Send ``msg`` to ``peer`` (zero-copy). With ``track`` return a tracker that is done
        when zmq no longer reads the tensors' memory. A vanished peer is logged, not raised."""
        trackers = self.reply_many([peer], msg, track)
        return trackers[0] if trackers else None

    def reply_many(
        self,
        peers: list[bytes],
        msg: Message,
        track: bool = False,
        before_part: Callable[[Message], None] | None = None,
    ) -> list[zmq.MessageTracker | None]:
        """Send the same ``msg`` to every peer, each part encoded (and authenticated) once and
        sent to all before the next is encoded; ``before_part(part)`` runs just before a part
        is encoded (even with no peers left). With ``track``: one tracker per part sent."""
        trackers: list[zmq.MessageTracker | None] = []
        live = list(peers)
        parts = split_message(msg, next(self._ids), self.part_bytes)
        for part in parts:
            if before_part is not None:
                before_part(part)
            frames = self.codec.encode(part)
            size = sum(_nbytes(f) for f in frames)
            shared = self._shared_for(live, size)
            if shared is not None:  # written once, read by every peer
                before = shared.written
                local = all(peer in self._peer_conn for peer in live)
                out = pack_frames(frames, shared, shared=True, min_bytes=_min_bytes(local))
                if shared.written != before:  # (nothing fitted: all inline)
                    self._sent_upto.update(dict.fromkeys(live, shared.written))
            for peer in list(live):
                if shared is None:
                    lanes = self._lanes.get(peer)
                    local = peer in self._peer_conn
                    out = pack_frames(
                        frames, lanes[1] if lanes else None, min_bytes=_min_bytes(local)
                    )
                if len(parts) == 1 and self._send_local(peer, out):
                    trackers.append(None)  # (the bytes are in a lane already)
                    self.bytes_out += size
                    continue
                try:
                    trackers.append(
                        self.socket.send_multipart([peer, *out], copy=False, track=track)
                    )
                except zmq.ZMQError as exc:
                    if exc.errno != zmq.EHOSTUNREACH:
                        raise
                    log.info("%s: peer %s is gone; dropped reply %r", self.name, peer.hex(), msg.op)
                    live.remove(peer)
                    self._sent_upto.pop(peer, None)  # it will not read what it did not get
                    continue
                self.bytes_out += size
        return trackers

    def close(self) -> None:
        self.socket.close()
        for fd in list(self._conns):
            self._drop_local(fd)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for lanes in self._lanes.values():
            for lane in lanes:
                lane.close()
        self._lanes = {}
        if self._shared is not None:
            self._shared.close()
            self._shared = None


class ClientChannel:
    """A DEALER socket connected to one server; ``peer`` names it in errors."""

    def __init__(self, codec: Codec, address: str, peer: str, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.codec = codec
        self.address = address
        self.peer = peer
        self.timeout = timeout
        self.socket = _context().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, _LINGER_MS)
        self.socket.connect(address)
        self.bytes_in = 0
        self.bytes_out = 0
        self.part_bytes = PART_BYTES
        self._parts = PartAssembler(codec.max_bytes)
        self._ids = itertools.count()
        self._lanes: tuple[Lane, Lane] | None = None  # (up, down) once the server took them
        self._shared: Lane | None = None  # the server's lane for replies to several clients
        self._local: socket.socket | None = None  # the server's local socket, if offered
        self._broken: str | None = None

    def send(self, msg: Message) -> None:
        """Queue ``msg`` for the server (zero-copy; returns before the bytes are sent). A large
        message goes as parts, each handed to zmq as soon as it is authenticated."""
        self._check()
        parts = split_message(msg, next(self._ids), self.part_bytes)
        for part in parts:
            frames = self.codec.encode(part)
            self.bytes_out += sum(_nbytes(f) for f in frames)
            lane = self._lanes[0] if self._lanes else None
            frames = pack_frames(frames, lane, min_bytes=_min_bytes(self._local is not None))
            if len(parts) == 1 and self._send_local(frames):
                continue
            self.socket.send_multipart(frames, copy=False)

    def _send_local(self, frames: list[Any]) -> bool:
        """Send a one-part message through the local socket if it is its head alone."""
        datagram = _as_datagram(frames)
        if self._local is None or datagram is None:
            return False
        try:
            self._local.send(datagram)
        except TimeoutError:
            self._broken = "a local send timed out"
            raise PeerTimeoutError(
                f"{self.peer} did not read its local socket within {self.timeout:g}s"
            ) from None
        except OSError as exc:  # the server closed it: the ZeroMQ socket carries on
            log.info("%s: local socket closed (%s)", self.peer, exc)
            self._close_local()
            return False
        return True

    def _wait(self, timeout_ms: int) -> Any:
        """The ZeroMQ socket or the local socket, whichever has a message; None after
        ``timeout_ms``."""
        fds = [] if self._local is None else [self._local.fileno()]
        ready = _ready(self.socket, timeout_ms, fds)
        if not ready:
            return None
        return self.socket if self.socket in ready else self._local

    def _close_local(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None

    def lane_space(self, nbytes: int) -> np.ndarray | None:
        """Writable space in the up lane for one large frame of the next message (a tensor
        built there is sent without a copy); None without lanes, for a frame too small to go
        through one, or when that would leave less than half the lane free (the frames of a
        large message are then copied in as they are sent, while the server frees others)."""
        if self._lanes is None or nbytes < MIN_FRAME_BYTES:
            return None
        up = self._lanes[0]
        return up.reserve(nbytes) if up.room - nbytes >= up.capacity // 2 else None

    def recv(
        self,
        awaiting: str,
        timeout: float | None = None,
        on_part: Callable[[Message], None] | None = None,
        views: bool = False,
    ) -> Message:
        """The next reply. Raises PeerTimeoutError after ``timeout`` (default: the channel's),
        :class:`WireError` for an error reply or a reply that fails the wire checks.
        ``on_part(part)`` sees each authenticated part of the reply as it arrives (the whole
        reply when it is one part), before the reply is returned. With ``views`` (and
        ``on_part``) the parts' tensors that came through a lane are views of it, valid only
        inside ``on_part`` (it copies what it keeps), and the returned reply has no tensors."""
        self._check()
        if views and on_part is None:
            raise ValueError("recv(views=True) needs on_part: the views die when it returns")
        down = self._lanes[1] if self._lanes else None
        shared = self._shared
        views = views and down is not None
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            source = self._wait(int(left * 1000))
            if source is None:
                self._broken = f"it timed out awaiting {awaiting}"
                raise PeerTimeoutError(
                    f"{self.peer} at {self.address} did not answer within {timeout:g}s "
                    f"(awaiting {awaiting}); is it running and reachable? Raise the limit with "
                    "concord run --timeout or CONCORD_TIMEOUT"
                )
            if source is self.socket:
                frames = self.socket.recv_multipart(copy=False)
            else:
                data = _datagram(self._local)
                if not data:  # the server closed it (its messages now come through ZeroMQ)
                    self._close_local()
                    continue
                frames = [data]
            try:
                msg, part = self._decode(frames, (down, shared), views, awaiting)
                if on_part is not None and part.op != "error":
                    on_part(part)  # e.g. load this part while the next one is on its way
            finally:
                if views:
                    down.release()
                    if shared is not None:
                        shared.release()
            if msg is not None:
                return raise_if_error(msg, self.peer)

    def _decode(
        self,
        frames: list[Any],
        lanes: tuple[Lane | None, Lane | None],
        views: bool,
        awaiting: str,
    ) -> tuple[Message | None, Message]:
        """(the whole reply once its last part is in, else None; this part); ``lanes`` are
        this client's down lane and the server's shared lane."""
        try:
            frames = unpack_frames(frames, lanes[0], copy=not views, shared=lanes[1])
            self.bytes_in += sum(len(f) for f in frames)
            part = self.codec.decode(frames)
            return self._parts.add(b"", replace(part, tensors={}) if views else part), part
        except (WireError, ValueError) as exc:
            exc = _wire_error(exc)
            raise WireError(exc.kind, f"bad reply from {self.peer} ({awaiting}): {exc}") from None

    def open_lanes(self, capacity: int | None = None) -> bool:
        """Offer the server shared-memory lanes (same host only); True if it took them.
        Call before any other request. Large frames then skip the TCP loopback path."""
        if self._lanes is not None or not Lane.available():
            return self._lanes is not None
        lanes: list[Lane] = []
        try:
            lanes.append(Lane.create(capacity or LANE_BYTES))
            lanes.append(Lane.create(lanes[0].capacity))
            up, down = lanes
            meta = {"up": up.path, "down": down.path, "capacity": up.capacity}
            reply = self.request(Message("lanes", meta=meta), awaiting="lanes")
            why = None if reply.meta.get("ok") is True else reply.meta.get("why", "refused")
        except PeerTimeoutError:  # a server that does not answer this answers nothing
            for lane in lanes:
                lane.close()
            raise
        except (ConcordError, OSError) as exc:  # e.g. a small /dev/shm: use the socket
            why = exc
        finally:
            for lane in lanes:  # mapped by both sides (or refused): nothing left to find
                lane.unlink()
        if why is not None:
            log.info("%s: no shared-memory lanes (%s)", self.peer, why)
            for lane in lanes:
                lane.close()
            return False
        self._lanes = (up, down)
        if "shared" in reply.meta:  # replies to several clients come through one lane
            try:
                path, token = str(reply.meta["shared"]), str(reply.meta["shared_token"])
                capacity = int(reply.meta["shared_capacity"])
                self._shared = Lane.attach_shared(path, capacity, up, token)
            except (KeyError, TypeError, ValueError, OSError) as exc:
                log.info("%s: cannot map its shared lane (%s)", self.peer, exc)
        if "local" in reply.meta:
            self._open_local(str(reply.meta["local"]), str(reply.meta.get("local_token")))
        return True

    def _open_local(self, name: str, token: str) -> None:
        """Connect to the server's local socket and say hello with ``token`` (on any failure
        everything keeps going through the ZeroMQ socket)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(self.timeout)
        try:
            sock.connect("\0" + name)
            hello = Message("local", meta={"token": token})
            sock.send(pack_frames(self.codec.encode(hello), None)[0])
            reply = self.codec.decode(unpack_frames([sock.recv(LOCAL_DATAGRAM_BYTES)], None))
            if reply.op != "local" or reply.meta.get("ok") is not True:
                raise WireError("remote", f"hello answered with {reply.op!r}")
        except TimeoutError:
            sock.close()
            self._broken = "it did not answer a local hello"
            raise PeerTimeoutError(
                f"{self.peer} did not answer on its local socket within {self.timeout:g}s"
            ) from None
        except (OSError, WireError, ValueError) as exc:
            log.info("%s: no local socket (%s)", self.peer, exc)
            sock.close()
            return
        self._local = sock

    def request(self, msg: Message, awaiting: str | None = None, timeout: float | None = None):
        """Send ``msg`` and wait for its reply."""
        self.send(msg)
        return self.recv(awaiting or f"the reply to {msg.op!r}", timeout)

    def _check(self) -> None:
        if self._broken:
            raise ProtocolError(
                f"the channel to {self.peer} is unusable because {self._broken}; open a new one"
            )

    def close(self, linger: float | None = None) -> None:
        """Close; pending sends get ``linger`` seconds (default 2 s, 0 after a timeout)."""
        if linger is None:
            linger = 0.0 if self._broken else _LINGER_MS / 1000
        self.socket.close(linger=int(linger * 1000))
        self._close_local()
        for lane in (*(self._lanes or ()), *([self._shared] if self._shared else [])):
            lane.close()
        self._lanes = self._shared = None


def _ready(socket: zmq.Socket, timeout_ms: int, fds: list[int]) -> list[Any]:
    """What has something to read among ``socket`` and the file descriptors ``fds``, waiting
    up to ``timeout_ms`` for one. A message already queued on ``socket`` is seen without a
    poll (a system call and a Poller per wait)."""
    if socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
        return [socket]
    items = [(socket, zmq.POLLIN), *((fd, zmq.POLLIN) for fd in fds)]
    return [what for what, _ in zmq.zmq_poll(items, timeout_ms)]


def _as_datagram(frames: list[Any]) -> Any | None:
    """The one local datagram socket frames go as: their head, if it is all of them (every
    buffer in a lane) and small enough; else None (they go through ZeroMQ)."""
    if len(frames) != 1 or len(frames[0]) > LOCAL_DATAGRAM_BYTES:
        return None
    return frames[0]


def _datagram(sock: socket.socket) -> bytes | None:
    """The next datagram on a local socket: b"" once it is closed (or reset: the peer is
    gone), None when nothing is waiting on a non-blocking one."""
    try:
        return sock.recv(LOCAL_DATAGRAM_BYTES)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def local_sockets_available() -> bool:
    """Whether this platform has the abstract Unix sockets local peers talk through."""
    return sys.platform.startswith("linux") and hasattr(socket, "SOCK_SEQPACKET")


def _min_bytes(local: bool) -> int:
    """The smallest buffer worth a lane: any, when that makes the message a local datagram."""
    return 0 if local else MIN_FRAME_BYTES  # (the socket is as fast for a small one)


def lanes_wanted() -> bool:
    """Whether clients offer their servers shared-memory lanes (``CONCORD_LANES=0``: never)."""
    return os.environ.get("CONCORD_LANES", "1") != "0"


def _wire_error(exc: Exception) -> WireError:
    """``exc`` as a WireError: a ValueError from parts or lanes is a malformed frame."""
    return exc if isinstance(exc, WireError) else WireError("frames", str(exc))


def _nbytes(frame: Any) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)
