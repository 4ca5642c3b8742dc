"""The server end of :mod:`concord.comm.channel`: a ROUTER socket that receives authenticated
requests and replies to them.

A :class:`ServerChannel` binds a ROUTER socket and hands out authenticated requests one at a
time (:meth:`ServerChannel.poll`); replies go to the peer that sent each. A bad message (bad
MAC, wrong version, malformed frames, oversize) never reaches the caller: it gets an error
reply and a log line, is counted in :attr:`ServerChannel.rejected`, and the server keeps
serving. Same-host clients may offer shared-memory lanes (:mod:`concord.comm.lanes`); with
``broadcast`` one reply to several of them is written once into a shared lane, and with
``local`` they may also talk through Unix datagram sockets (:mod:`concord.comm.local`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import zmq

from concord.comm.channel import (
    LINGER_MS,
    message_bytes,
    min_lane_bytes,
    poll_ready,
    zmq_context,
)
from concord.comm.lanes import Lane, pack_frames, unpack_frames
from concord.comm.local import LocalListener, local_sockets_available
from concord.comm.parts import PART_BYTES, PART_KEY, PartAssembler, split_message
from concord.comm.spin import spin_seconds
from concord.comm.wire import (
    MAX_HEADER_BYTES,
    Codec,
    Message,
    WireError,
    as_wire_error,
    error_message,
)
from concord.errors import ConcordError

log = logging.getLogger("concord.wire")


@dataclass(frozen=True)
class Request:
    """An authenticated request: the sender's zmq identity, its message and its size."""

    peer: bytes
    msg: Message
    nbytes: int


@dataclass(frozen=True)
class LaneBytes:
    """A server's shared-memory lane traffic: bytes ``received`` and ``sent`` through lanes,
    and of those sent, the bytes written once into the shared lane for several peers."""

    received: int
    sent: int
    shared: int


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
        self.socket = zmq_context().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
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
        self._listener: LocalListener | None = None  # with local, once a peer took lanes
        self.rejected: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.spin = spin_seconds()  # polled without blocking before a wait sleeps

    @property
    def address(self) -> str:
        """The ``tcp://host:port`` clients connect to."""
        return f"tcp://{self.host}:{self.port}"

    @property
    def local_messages(self) -> list[int]:
        """Requests in and replies out through local sockets."""
        return self._listener.messages if self._listener is not None else [0, 0]

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
                got = self._listener.recv(source) if self._listener is not None else None
                if got is None:
                    if time.monotonic() >= deadline:
                        return None
                    continue
                peer, body = got
            try:
                lanes = self._lanes.get(peer)
                views = self.lane_views and lanes is not None
                body, places = unpack_frames(body, lanes[0] if lanes else None, copy=not views)
                self.bytes_in += sum(len(f) for f in body)  # lane bytes count too, as sent
                if views:
                    self._held.append(lanes[0])  # (also when decode fails: freed next poll)
                part = self.codec.decode(body, places)
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
                exc = as_wire_error(exc)
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
        listener = self._listener
        while True:
            fds = [] if listener is None else listener.fds()
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            ready = poll_ready(self.socket, left_ms, fds, self.spin)
            if not ready:
                return None
            if fds and fds[0] in ready:
                listener.accept()
            for what in ready:
                if what is self.socket or listener is not None and listener.serves(what):
                    return what

    def _local_listener(self) -> LocalListener | None:
        """The Unix datagram socket local peers connect to (created on first use)."""
        if self.local and self._listener is None:
            try:
                self._listener = LocalListener(self.codec, self.name, self.rejected)
            except OSError as exc:
                log.info("%s: no local sockets (%s)", self.name, exc)
                self.local = False
        return self._listener

    def _is_local(self, peer: bytes) -> bool:
        return self._listener is not None and self._listener.has(peer)

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
            meta |= listener.offer(peer)
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
    def lane_bytes(self) -> LaneBytes:
        """Bytes received and sent through shared-memory lanes (part of bytes_in/out)."""
        lanes = self._lanes.values()
        shared = self._shared.moved if self._shared is not None else 0
        sent = sum(down.moved for _, down in lanes) + shared
        return LaneBytes(sum(up.moved for up, _ in lanes), sent, shared)

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
            header, buffers = self.codec.body(part)
            size = message_bytes(header, buffers)
            signed = functools.cache(functools.partial(self.codec.sign, header, buffers))
            shared = self._shared_for(live, size)
            if shared is not None:  # written once, read by every peer
                before = shared.written
                local = all(self._is_local(peer) for peer in live)
                out = pack_frames(
                    self.codec, header, buffers, shared, True, min_lane_bytes(local), signed
                )
                if shared.written != before:  # (nothing fitted: all inline)
                    self._sent_upto.update(dict.fromkeys(live, shared.written))
            for peer in list(live):
                if shared is None:
                    lanes = self._lanes.get(peer)
                    local = self._is_local(peer)
                    lane = lanes[1] if lanes else None
                    out = pack_frames(
                        self.codec, header, buffers, lane, False, min_lane_bytes(local), signed
                    )
                if len(parts) == 1 and self._listener and self._listener.send(peer, out):
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
