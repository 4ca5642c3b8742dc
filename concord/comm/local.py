"""Local Unix datagram sockets beside ZeroMQ: a same-host shortcut for message heads.

A server made with ``local=True`` offers each same-host client that took its shared-memory
lanes (:mod:`concord.comm.lanes`) an abstract Unix ``SOCK_SEQPACKET`` socket (Linux; abstract
names leave no file behind). A message whose buffers all went into lanes is then one datagram
(its head: MAC, header, lane map) instead of a trip through ZeroMQ's I/O threads and the TCP
loopback; anything else still goes through ZeroMQ. Every datagram is authenticated like any
message. A connection's first datagram must be a ``local`` hello carrying the one-time token
the server gave one client in its (authenticated) lanes reply; only then do the connection's
datagrams count as that client's. A connection that says anything else is dropped, and at
most :data:`MAX_STRANGERS` connections may wait for their hello. Once a client's link is up,
the server never closes it while it serves: a client that sees it end knows at once that
the server process ended (its error says so, instead of waiting out the timeout).

:class:`LocalListener` is the server's side, :func:`connect_local` the client's; the channels
of :mod:`concord.comm.channel` use them.
"""

from __future__ import annotations

import logging
import secrets
import socket
import sys
from collections import Counter
from typing import Any

from concord.comm.lanes import socket_frames, unpack_frames
from concord.comm.wire import Codec, Message, WireError, as_wire_error

log = logging.getLogger("concord.wire")
LOCAL_DATAGRAM_BYTES = 60 << 10  # the largest message head sent as one local datagram
MAX_STRANGERS = 32  # local connections that have not said hello yet


class LocalListener:
    """A server's local socket, its connections, and the peer each connection speaks for.
    ``messages`` counts datagram requests in and replies out; rejected hellos are counted in
    ``rejected`` (the channel's counter) by kind."""

    def __init__(self, codec: Codec, name: str, rejected: Counter[str]) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind("\0concord-" + secrets.token_hex(16))  # abstract: no file
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.codec, self.name, self.rejected = codec, name, rejected
        self.messages = [0, 0]
        self._conns: dict[int, socket.socket] = {}  # fd -> accepted connection
        self._conn_peer: dict[int, bytes] = {}  # fd -> the peer that said hello on it
        self._peer_conn: dict[bytes, socket.socket] = {}
        self._tokens: dict[str, bytes] = {}  # hello token -> the peer it was given to

    def offer(self, peer: bytes) -> dict[str, str]:
        """What ``peer``'s lanes reply carries: the socket's name and a fresh one-time token
        (replacing any earlier one of that peer) to say hello with."""
        token = secrets.token_hex(16)
        self._tokens = {t: p for t, p in self._tokens.items() if p != peer}
        self._tokens[token] = peer
        return {"local": self.sock.getsockname()[1:].decode(), "local_token": token}

    def fds(self) -> list[int]:
        """The descriptors to poll: the listening socket first, then every connection."""
        return [self.sock.fileno(), *self._conns]

    def serves(self, fd: Any) -> bool:
        """Whether ``fd`` is one of this listener's connections."""
        return fd in self._conns

    def has(self, peer: bytes) -> bool:
        """Whether ``peer`` said hello on a connection that is still open."""
        return peer in self._peer_conn

    def accept(self) -> None:
        """Take a waiting connection (it must say hello before anything it sends counts)."""
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        if len(self._conns) - len(self._conn_peer) >= MAX_STRANGERS:
            conn.close()  # (only the job's clients get a token to say hello with)
            return
        conn.setblocking(False)
        self._conns[conn.fileno()] = conn

    def recv(self, fd: int) -> tuple[bytes, list[Any]] | None:
        """(peer, socket frames) of the datagram waiting on connection ``fd``; None for a
        hello, a closed connection or nothing to read."""
        data = datagram(self._conns[fd])
        if data is None:
            return None
        peer = self._conn_peer.get(fd)
        if not data:
            self.drop(fd)
            return None
        if peer is None:
            self._hello(fd, data)
            return None
        self.messages[0] += 1
        return peer, [data]

    def _hello(self, fd: int, data: bytes) -> None:
        """The first datagram on a connection: an authenticated ``local`` message with the
        token this server gave one peer; that peer's messages may then come this way."""
        conn = self._conns[fd]
        try:
            msg = _read_head(self.codec, data)
            peer = self._tokens.pop(str(msg.meta.get("token")), None)
            if msg.op != "local" or peer is None:
                raise WireError("request", "a local connection must begin with a valid hello")
        except (WireError, ValueError) as exc:
            exc = as_wire_error(exc)
            self.rejected[exc.kind] += 1
            log.warning("%s: rejected a local connection: %s", self.name, exc)
            self.drop(fd)
            return
        old = self._peer_conn.pop(peer, None)
        if old is not None:
            self.drop(old.fileno())
        self._conn_peer[fd] = peer
        self._peer_conn[peer] = conn
        try:
            conn.send(_head(self.codec, Message("local", meta={"ok": True})))
        except OSError:
            self.drop(fd)

    def send(self, peer: bytes, out: list[Any]) -> bool:
        """Send ``out`` (socket frames) to ``peer`` as one datagram if it can go that way: it
        has a connection, the message is its head alone (every buffer is in a lane) and small
        enough, and the datagram fits its socket's buffer now."""
        conn, head = self._peer_conn.get(peer), as_datagram(out)
        if conn is None or head is None:
            return False
        try:
            conn.send(head)
        except BlockingIOError:  # it is not reading: ZeroMQ queues the message instead
            return False
        except (BrokenPipeError, ConnectionResetError):  # it is gone
            self.drop(conn.fileno())
            return False
        except OSError:  # (anything else: this message goes through ZeroMQ, the link stays;
            return False  # a client takes the end of its link as this server's end)
        self.messages[1] += 1
        return True

    def drop(self, fd: int) -> None:
        """Close connection ``fd`` (its peer's messages go through ZeroMQ from now on)."""
        conn = self._conns.pop(fd, None)
        peer = self._conn_peer.pop(fd, None)
        if peer is not None and self._peer_conn.get(peer) is conn:
            del self._peer_conn[peer]
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for fd in list(self._conns):
            self.drop(fd)
        self.sock.close()


def connect_local(codec: Codec, name: str, token: str, timeout: float) -> socket.socket:
    """A connection to the server's local socket ``name``, greeted with ``token`` and
    answered. Raises TimeoutError if the server does not answer within ``timeout`` seconds,
    OSError, WireError or ValueError if it cannot connect or refuses."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    try:
        sock.connect("\0" + name)
        sock.send(_head(codec, Message("local", meta={"token": token})))
        reply = _read_head(codec, sock.recv(LOCAL_DATAGRAM_BYTES))
        if reply.op != "local" or reply.meta.get("ok") is not True:
            raise WireError("remote", f"hello answered with {reply.op!r}")
    except BaseException:
        sock.close()
        raise
    return sock


def _head(codec: Codec, msg: Message) -> bytes:
    """A small message (no lanes) as the one datagram it travels as."""
    return socket_frames(codec.encode(msg))[0]


def _read_head(codec: Codec, data: bytes) -> Message:
    """The authenticated message of a datagram that :func:`_head` made (WireError if not)."""
    return codec.decode(*unpack_frames([data], None))


def as_datagram(frames: list[Any]) -> Any | None:
    """The one local datagram socket frames go as: their head, if it is all of them (every
    buffer in a lane) and small enough; else None (they go through ZeroMQ)."""
    if len(frames) != 1 or len(frames[0]) > LOCAL_DATAGRAM_BYTES:
        return None
    return frames[0]


def datagram(sock: socket.socket) -> bytes | None:
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
