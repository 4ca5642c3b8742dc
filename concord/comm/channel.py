"""ZeroMQ channels carrying :mod:`concord.comm.wire` messages: ROUTER server, DEALER client.

A :class:`ServerChannel` binds a ROUTER socket, hands out authenticated requests one at a time
(:meth:`ServerChannel.poll`) and replies to the peer that sent each. A bad message (bad MAC,
wrong version, malformed frames, oversize) never reaches the caller: it gets an error reply and
a log line, is counted in :attr:`ServerChannel.rejected`, and the server keeps serving.

A :class:`ClientChannel` connects a DEALER socket to one server. Replies come back in the
order requests were sent (one server loop per socket); every wait has a timeout whose
:class:`~concord.errors.PeerTimeoutError` names the peer and what was awaited. Tensors are
sent without copies (zmq keeps a reference until the bytes are on the socket); received
tensors share the received frames' memory.

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

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import zmq

from concord.comm.wire import (
    MAX_HEADER_BYTES,
    Codec,
    Message,
    WireError,
    error_message,
    raise_if_error,
)
from concord.errors import PeerTimeoutError, ProtocolError

log = logging.getLogger("concord.wire")
_LINGER_MS = 2000


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

    def __init__(self, codec: Codec, host: str = "127.0.0.1", port: int = 0, name: str = "server"):
        self.codec = codec
        self.name = name
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
        self.rejected: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def address(self) -> str:
        """The ``tcp://host:port`` clients connect to."""
        return f"tcp://{self.host}:{self.port}"

    def poll(self, timeout: float) -> Request | None:
        """The next authenticated request, or None if none came within ``timeout`` seconds.

        Rejected messages are answered with an error reply and skipped.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.socket.poll(left_ms, zmq.POLLIN):
                return None
            frames = self.socket.recv_multipart(copy=False)
            peer, body = frames[0].bytes, frames[1:]
            nbytes = sum(len(f) for f in body)
            self.bytes_in += nbytes
            try:
                return Request(peer, self.codec.decode(body), nbytes)
            except WireError as exc:
                self.rejected[exc.kind] += 1
                log.warning("%s: rejected a message from peer %s: %s", self.name, peer.hex(), exc)
                self.reply(peer, error_message(exc.kind, str(exc)))
            if time.monotonic() >= deadline:
                return None

    def reply(self, peer: bytes, msg: Message, track: bool = False) -> zmq.MessageTracker | None:
        """Send ``msg`` to ``peer`` (zero-copy). With ``track`` return a tracker that is done
        when zmq no longer reads the tensors' memory. A vanished peer is logged, not raised."""
        return self.reply_many([peer], msg, track)[0]

    def reply_many(
        self, peers: list[bytes], msg: Message, track: bool = False
    ) -> list[zmq.MessageTracker | None]:
        """Send the same ``msg`` to every peer, encoded (and authenticated) once."""
        frames = self.codec.encode(msg)
        size = sum(_nbytes(f) for f in frames)
        trackers = []
        for peer in peers:
            try:
                trackers.append(
                    self.socket.send_multipart([peer, *frames], copy=False, track=track)
                )
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                log.info("%s: peer %s is gone; dropped reply %r", self.name, peer.hex(), msg.op)
                trackers.append(None)
                continue
            self.bytes_out += size
        return trackers

    def close(self) -> None:
        self.socket.close()


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
        self._broken: str | None = None

    def send(self, msg: Message) -> None:
        """Queue ``msg`` for the server (zero-copy; returns before the bytes are sent)."""
        self._check()
        frames = self.codec.encode(msg)
        self.socket.send_multipart(frames, copy=False)
        self.bytes_out += sum(_nbytes(f) for f in frames)

    def recv(self, awaiting: str, timeout: float | None = None) -> Message:
        """The next reply. Raises PeerTimeoutError after ``timeout`` (default: the channel's),
        :class:`WireError` for an error reply or a reply that fails the wire checks."""
        self._check()
        timeout = self.timeout if timeout is None else timeout
        if not self.socket.poll(int(timeout * 1000), zmq.POLLIN):
            self._broken = f"it timed out awaiting {awaiting}"
            raise PeerTimeoutError(
                f"{self.peer} at {self.address} did not answer within {timeout:g}s "
                f"(awaiting {awaiting}); is it running and reachable? Raise the limit with "
                "concord run --timeout or CONCORD_TIMEOUT"
            )
        frames = self.socket.recv_multipart(copy=False)
        self.bytes_in += sum(len(f) for f in frames)
        try:
            msg = self.codec.decode(frames)
        except WireError as exc:
            raise WireError(exc.kind, f"bad reply from {self.peer} ({awaiting}): {exc}") from None
        return raise_if_error(msg, self.peer)

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


def _nbytes(frame: Any) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)
