"""Shared-memory ring links between worker processes on one host.

Each worker owns one shared-memory file (``/dev/shm`` where it exists): a small header with
two counters, then its *wire* area. Its right neighbour reads the wire directly (no copy
through the kernel); the counters say how far each side has got:

- ``posted``: pieces this worker has made ready for its right neighbour;
- ``consumed``: pieces this worker has finished reading from its left neighbour.

A waiter first checks the counter; when it must block it sleeps in ``recv`` on a Unix socket
to that neighbour, which the other side writes one byte to after each post or release. The
socket also tells a waiter at once when its neighbour dies (end of file), and every wait has
a deadline, so nothing hangs: the error names the neighbour's rank and what was awaited.
The file is unlinked as soon as both neighbours have mapped it, so nothing leaks on a crash.

Counters are plain 64-bit stores, written after the data they publish; x86-64's total store
order makes that safe. ``ShmRing.available()`` says whether this platform qualifies.
"""

from __future__ import annotations

import hmac
import mmap
import os
import platform
import secrets
import select
import socket
import sys
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch

from concord.errors import ConcordError, PeerTimeoutError

HEADER = 4096  # bytes before the wire area (keeps the wire page aligned)
_POSTED, _CONSUMED = 0, 8  # int64 slots (64 bytes apart in bytes: 0 and 64)
_HELLO = b"concord-ring-hello"


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _sock_address(token: str) -> str:
    if sys.platform.startswith("linux"):
        return "\0concord-ring-" + token  # abstract namespace: no file to clean up
    return os.path.join(tempfile.gettempdir(), f"concord-ring-{token}.sock")


def _map(path: str, nbytes: int, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create and hasattr(os, "posix_fallocate"):
            try:  # reserve the pages now: a full /dev/shm fails here, not with SIGBUS later
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as exc:
                os.unlink(path)
                raise ConcordError(
                    f"cannot reserve {nbytes} bytes of shared memory in {os.path.dirname(path)}"
                    f" ({exc}); enlarge it (docker run --shm-size) or use AllReduce("
                    'engine="torch")'
                ) from None
        elif create:
            os.ftruncate(fd, nbytes)
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


class _Link:
    """One neighbour: its mapped file, its counter, and the socket to it."""

    def __init__(self, rank: int, mem: mmap.mmap, sock: socket.socket) -> None:
        self.rank = rank
        self.mem = mem
        self.counters = memoryview(mem)[:HEADER].cast("q")
        self.sock = sock
        sock.setblocking(False)

    def wake(self) -> None:
        try:
            self.sock.send(b"\x01")  # the socket is non-blocking: never waits
        except OSError:
            pass  # full: unread bytes are already waiting, so the peer wakes anyway; or
            # closed: the peer waits for nothing more (if it died, our next wait names it)


class ShmRing:
    """This worker's place in a ring of shared-memory links (see module docstring).

    ``nbytes`` is the wire area's size. Built collectively: every worker of the ring calls
    it with the same ``prefix`` (a store key prefix unique to this ring).
    """

    @staticmethod
    def available(nbytes: int = 0) -> bool:
        """Whether this platform qualifies (x86-64: ordered stores) with ``nbytes`` free."""
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return False
        if not os.access(_shm_dir(), os.W_OK):
            return False
        stat = os.statvfs(_shm_dir())
        return stat.f_bavail * stat.f_frsize >= nbytes + HEADER

    def __init__(
        self,
        rank: int,
        world: int,
        store: Any,
        prefix: str,
        nbytes: int,
        timeout: float,
        secret: bytes = b"",
    ) -> None:
        if world < 2:
            raise ValueError(f"a ring needs at least 2 workers, got world={world}")
        self.rank, self.world, self.timeout = rank, world, timeout
        self.nbytes = nbytes
        self._key = hmac.new(secret or b"concord", prefix.encode(), "sha256").digest()
        self.left_rank, self.right_rank = (rank - 1) % world, (rank + 1) % world
        token = secrets.token_hex(8)
        path = os.path.join(_shm_dir(), f"concord-ring-{token}")
        self.mem = _map(path, HEADER + nbytes, create=True)
        self.counters = memoryview(self.mem)[:HEADER].cast("q")
        try:
            self._connect(store, prefix, token, path)
        finally:
            os.unlink(path)
        self.wire = torch.frombuffer(self.mem, dtype=torch.uint8, count=nbytes, offset=HEADER)
        self.left_wire = torch.frombuffer(
            self.left.mem, dtype=torch.uint8, count=nbytes, offset=HEADER
        )
        self.n_posted = 0  # my posts so far (mirrors my 'posted' counter)
        self.n_peeked = 0  # left's posts I have taken so far
        self.n_released = 0
        self._post_index: dict[tuple[int, int], int] = {}  # byte range -> index of its last post

    # -- set-up ----------------------------------------------------------------------
    def _connect(self, store: Any, prefix: str, token: str, path: str) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(_sock_address(token))
        listener.listen(2)
        store.set(f"{prefix}{self.rank}", f"{token} {path} {platform.node()}")
        try:
            right_token, right_path, right_host = self._lookup(store, prefix, self.right_rank)
            if right_host != platform.node():
                raise ConcordError(
                    f"worker rank {self.right_rank} runs on host {right_host!r}, not "
                    f"{platform.node()!r}: the shared-memory ring needs every worker on one "
                    'host; use AllReduce(engine="torch") across hosts'
                )
            right_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            right_sock.settimeout(self.timeout)
            right_sock.connect(_sock_address(right_token))
            right_sock.sendall(self._hello(self.rank))
            left_sock = self._accept(listener)
        finally:
            listener.close()
        _, left_path, _ = self._lookup(store, prefix, self.left_rank)
        self.left = _Link(self.left_rank, _map(left_path, HEADER + self.nbytes, False), left_sock)
        if self.right_rank == self.left_rank:
            right_mem = self.left.mem
        else:
            right_mem = _map(right_path, HEADER + self.nbytes, False)
        self.right = _Link(self.right_rank, right_mem, right_sock)
        store.set(f"{prefix}{self.rank}/mapped", "1")
        self._lookup(store, prefix, self.left_rank, "/mapped")
        self._lookup(store, prefix, self.right_rank, "/mapped")

    def _hello(self, rank: int) -> bytes:
        tag = hmac.new(self._key, _HELLO + rank.to_bytes(4, "little"), "sha256").digest()
        return rank.to_bytes(4, "little") + tag

    def _accept(self, listener: socket.socket) -> socket.socket:
        listener.settimeout(self.timeout)
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            raise PeerTimeoutError(
                f"worker rank {self.left_rank} did not connect its ring link to worker rank "
                f"{self.rank} within {self.timeout:g}s"
            ) from None
        sock.settimeout(self.timeout)
        hello = b""
        while len(hello) < 36:
            part = sock.recv(36 - len(hello))
            if not part:
                break
            hello += part
        if len(hello) != 36 or not hmac.compare_digest(hello, self._hello(self.left_rank)):
            sock.close()
            raise ConcordError(
                f"worker rank {self.rank}: the process that connected to its ring link is not "
                f"worker rank {self.left_rank} of this job (bad hello)"
            )
        return sock

    def _lookup(self, store: Any, prefix: str, rank: int, suffix: str = "") -> list[str]:
        key = f"{prefix}{rank}{suffix}"
        try:
            store.wait([key], timedelta(seconds=self.timeout))
        except Exception:  # noqa: BLE001 - the store raises plain RuntimeError/TimeoutError
            raise PeerTimeoutError(
                f"worker rank {rank} did not publish its ring link ({key!r}) within "
                f"{self.timeout:g}s; did it crash or use another AllReduce engine?"
            ) from None
        return store.get(key).decode().split(" ")

    # -- the Communicator primitives, over byte ranges of the wire ----------------------
    def _wait(self, link: _Link, slot: int, target: int, what: str) -> None:
        if link.counters[slot] >= target:
            return
        deadline = time.monotonic() + self.timeout
        while link.counters[slot] < target:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerTimeoutError(
                    f"worker rank {self.rank}: worker rank {link.rank} did not {what} within "
                    f"{self.timeout:g}s"
                )
            readable, _, _ = select.select([link.sock], [], [], remaining)
            if not readable:
                continue
            try:
                data = link.sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise ConcordError(f"ring link to worker rank {link.rank} broke: {exc}") from None
            if not data and link.counters[slot] < target:
                raise ConcordError(
                    f"worker rank {self.rank}: worker rank {link.rank} closed its ring link "
                    f"while this worker waited for it to {what} (did it exit or crash?)"
                )

    def claim_bytes(self, start: int, stop: int, whole: bool) -> None:
        """Wait until the right neighbour has read my last post of [start, stop).

        ``whole``: a region's first claim in an allreduce; it looks at every record that
        overlaps (and then drops them); later claims of its pieces look up exact ranges.
        """
        if whole:
            overlap = [k for k in self._post_index if k[0] < stop and start < k[1]]
            need = max((self._post_index[k] for k in overlap), default=0)
        else:
            need = self._post_index.get((start, stop), 0)
        self._wait(self.right, _CONSUMED, need, "finish reading this worker's previous data")
        if whole:
            for key in overlap:
                del self._post_index[key]

    def post_bytes(self, start: int, stop: int) -> None:
        self.n_posted += 1
        self._post_index[(start, stop)] = self.n_posted
        self.counters[_POSTED] = self.n_posted
        self.right.wake()

    def peek_bytes(self) -> None:
        self.n_peeked += 1
        self._wait(self.left, _POSTED, self.n_peeked, "post its next piece")

    def release_bytes(self) -> None:
        self.n_released += 1
        self.counters[_CONSUMED] = self.n_released
        self.left.wake()

    def region(self, offset: int, numel: int, dtype: torch.dtype) -> ShmRegion:
        """A Communicator over ``numel`` elements of ``dtype`` at byte ``offset`` of the wire."""
        size = torch.empty((), dtype=dtype).element_size()
        if offset % size or offset + numel * size > self.nbytes:
            raise ValueError(
                f"region [{offset}, {offset + numel * size}) does not fit the wire "
                f"({self.nbytes} bytes) or is misaligned for {dtype}"
            )
        return ShmRegion(self, offset, numel, dtype)

    def close(self) -> None:
        """Close the sockets (the neighbours see end of file); the memory goes with the GC."""
        for link in {id(self.left): self.left, id(self.right): self.right}.values():
            link.sock.close()


class ShmRegion:
    """A :class:`concord.algorithms.ring.Communicator` over one region of a :class:`ShmRing`."""

    def __init__(self, ring: ShmRing, offset: int, numel: int, dtype: torch.dtype) -> None:
        self.ring, self.rank, self.world = ring, ring.rank, ring.world
        self.size = torch.empty((), dtype=dtype).element_size()
        self.offset = offset
        nbytes = numel * self.size
        self.mine = ring.wire[offset : offset + nbytes].view(dtype)
        self.left = ring.left_wire[offset : offset + nbytes].view(dtype)

    def _bytes(self, start: int, stop: int) -> tuple[int, int]:
        return self.offset + start * self.size, self.offset + stop * self.size

    def claim(self, start: int, stop: int) -> torch.Tensor:
        whole = start == 0 and stop == self.mine.numel()
        self.ring.claim_bytes(*self._bytes(start, stop), whole)
        return self.mine[start:stop]

    def post(self, start: int, stop: int) -> None:
        self.ring.post_bytes(*self._bytes(start, stop))

    def peek(self, start: int, stop: int) -> torch.Tensor:
        self.ring.peek_bytes()
        return self.left[start:stop]

    def release(self, start: int, stop: int) -> None:
        self.ring.release_bytes()
