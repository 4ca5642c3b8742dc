"""ZeroMQ channels carrying :mod:`concord.comm.wire` messages: ROUTER server, DEALER client.

A :class:`~concord.comm.server_channel.ServerChannel` (its own module) binds a ROUTER socket,
hands out authenticated requests one at a time and replies to the peer that sent each; a bad
message never reaches its caller: it gets an error reply, and the server keeps serving.

A :class:`ClientChannel` connects a DEALER socket to one server. Replies come back in the
order requests were sent (one server loop per socket); every wait has a timeout whose
:class:`~concord.errors.PeerTimeoutError` names the peer and what was awaited. Tensors are
sent without copies (zmq keeps a reference until the bytes are on the socket); received
tensors share the received frames' memory. On one host a client may offer its server
shared-memory lanes (:mod:`concord.comm.lanes`) for the large frames; a receiver that uses
what it gets at once can read them in place (``ServerChannel(lane_views=True)``,
``ClientChannel.recv(views=True)``). A server made with ``local=True`` also offers those
clients a Unix datagram socket (:mod:`concord.comm.local`) for messages whose buffers all went
into lanes. A client has one request in flight at a time, and a multi-part message keeps to
the ZeroMQ socket, so messages cannot overtake each other across the two.

Example (the data server and the parameter servers use exactly this)::

    from concord.comm.server_channel import ServerChannel
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
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import zmq

from concord.comm.lanes import LANE_BYTES, MIN_FRAME_BYTES, Lane, pack_frames, unpack_frames
from concord.comm.local import (
    as_datagram,
    connect_local,
    datagram,
)
from concord.comm.parts import PART_BYTES, PartAssembler, split_message
from concord.comm.spin import spin_seconds
from concord.comm.wire import (
    MAC_BYTES,
    Codec,
    Message,
    WireError,
    as_wire_error,
    raise_if_error,
)
from concord.errors import ConcordError, PeerTimeoutError, ProtocolError

log = logging.getLogger("concord.wire")
LINGER_MS = 2000


def zmq_context() -> zmq.Context:
    return zmq.Context.instance()


class ClientChannel:
    """A DEALER socket connected to one server; ``peer`` names it in errors."""

    def __init__(self, codec: Codec, address: str, peer: str, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.codec = codec
        self.address = address
        self.peer = peer
        self.timeout = timeout
        self.socket = zmq_context().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
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
        self.spin = spin_seconds()  # polled without blocking before a wait sleeps

    def send(self, msg: Message) -> None:
        """Queue ``msg`` for the server (zero-copy; returns before the bytes are sent). A large
        message goes as parts, each handed to zmq as soon as it is authenticated."""
        self._check()
        parts = split_message(msg, next(self._ids), self.part_bytes)
        for part in parts:
            header, buffers = self.codec.body(part)
            self.bytes_out += message_bytes(header, buffers)
            lane = self._lanes[0] if self._lanes else None
            local = self._local is not None
            frames = pack_frames(self.codec, header, buffers, lane, min_bytes=min_lane_bytes(local))
            if len(parts) == 1 and self._send_local(frames):
                continue
            self.socket.send_multipart(frames, copy=False)

    def _send_local(self, frames: list[Any]) -> bool:
        """Send a one-part message through the local socket if it is its head alone."""
        head = as_datagram(frames)
        if self._local is None or head is None:
            return False
        try:
            self._local.send(head)
        except TimeoutError:
            self._broken = "a local send timed out"
            raise PeerTimeoutError(
                f"{self.peer} did not read its local socket within {self.timeout:g}s"
            ) from None
        except (BrokenPipeError, ConnectionResetError):
            self._server_ended("sending a request")
        except OSError as exc:  # anything else: the ZeroMQ socket carries on
            log.info("%s: local socket failed (%s)", self.peer, exc)
            self._close_local()
            return False
        return True

    def _server_ended(self, awaiting: str) -> None:
        """The server closed our local link, which it does only when its process ends."""
        self._close_local()
        self._broken = "its process ended"
        raise PeerTimeoutError(
            f"{self.peer} at {self.address} closed its connection to this process while it was "
            f"{awaiting}: the server exited or crashed (check its log)"
        )

    def _wait(self, timeout_ms: int) -> Any:
        """The ZeroMQ socket or the local socket, whichever has a message; None after
        ``timeout_ms``."""
        fds = [] if self._local is None else [self._local.fileno()]
        ready = poll_ready(self.socket, timeout_ms, fds, self.spin)
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
                data = datagram(self._local)
                if data is None:
                    continue
                if not data:
                    self._server_ended(f"awaiting {awaiting}")
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
            frames, places = unpack_frames(frames, lanes[0], copy=not views, shared=lanes[1])
            self.bytes_in += sum(len(f) for f in frames)
            part = self.codec.decode(frames, places)
            return self._parts.add(b"", replace(part, tensors={}) if views else part), part
        except (WireError, ValueError) as exc:
            exc = as_wire_error(exc)
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
        try:
            self._local = connect_local(self.codec, name, token, self.timeout)
        except TimeoutError:
            self._broken = "it did not answer a local hello"
            raise PeerTimeoutError(
                f"{self.peer} did not answer on its local socket within {self.timeout:g}s"
            ) from None
        except (OSError, WireError, ValueError) as exc:
            log.info("%s: no local socket (%s)", self.peer, exc)

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
            linger = 0.0 if self._broken else LINGER_MS / 1000
        self.socket.close(linger=int(linger * 1000))
        self._close_local()
        for lane in (*(self._lanes or ()), *([self._shared] if self._shared else [])):
            lane.close()
        self._lanes = self._shared = None


def poll_ready(socket: zmq.Socket, timeout_ms: int, fds: list[int], spin: float = 0.0) -> list[Any]:
    """What has something to read among ``socket`` and the file descriptors ``fds``, waiting
    up to ``timeout_ms`` for one. A message already queued on ``socket`` is seen without a
    poll (a system call and a Poller per wait). With ``spin`` (seconds, see
    :mod:`concord.comm.spin`) it first looks without blocking for that long, yielding the core
    after each look, and only then sleeps in the kernel for the rest of the timeout."""
    if socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
        return [socket]
    items = [(socket, zmq.POLLIN), *((fd, zmq.POLLIN) for fd in fds)]
    if spin > 0 and timeout_ms > 0:
        start = time.perf_counter()
        spin = min(spin, timeout_ms / 1000)
        while True:
            ready = zmq.zmq_poll(items, 0)
            if ready:
                return [what for what, _ in ready]
            spent = time.perf_counter() - start
            if spent >= spin:
                break
            os.sched_yield()  # a runnable thread of this core (zmq's I/O) goes first
        timeout_ms = max(0, timeout_ms - int(spent * 1000))
    return [what for what, _ in zmq.zmq_poll(items, timeout_ms)]


def min_lane_bytes(local: bool) -> int:
    """The smallest buffer worth a lane: any, when that makes the message a local datagram."""
    return 0 if local else MIN_FRAME_BYTES  # (the socket is as fast for a small one)


def lanes_wanted() -> bool:
    """Whether clients offer their servers shared-memory lanes (``CONCORD_LANES=0``: never)."""
    return os.environ.get("CONCORD_LANES", "1") != "0"


def message_bytes(header: bytes, buffers: list[memoryview]) -> int:
    """The bytes of a message with this header and these buffers (:meth:`Codec.body`), its
    MAC included."""
    return MAC_BYTES + len(header) + sum(b.nbytes for b in buffers)
