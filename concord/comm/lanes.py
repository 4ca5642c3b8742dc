"""Shared-memory lanes: a same-host shortcut for the bulk frames of wire messages.

A :class:`Lane` is a one-way byte ring in a shared-memory file with one writer and one reader.
When a client and its server share a host (and ``/dev/shm``), the client creates two lanes
(up and down) and offers them to the server (op ``lanes``); from then on a large buffer frame
is copied into the lane and the ZeroMQ message carries its (buffer index, lane position,
length) in its place. The receiver copies the bytes out into its own memory and frees the
lane space (or, where the caller asks for views, reads them in place and frees the space once
it is done), and hands the restored frames to :class:`~concord.comm.wire.Codec`, which
checks the header and every frame as if they had come through the socket. The MAC covers a
lane frame's place (:class:`~concord.comm.wire.LaneRef`: which lane, position, length), not
its bytes: once both ends have mapped a lane its file is gone, so only the authenticated peer
(which could send any bytes anyway) can still write there, and it never reuses space the
reader has not freed. Before that the file is ``0600`` (this user's processes, which can read
the job's secret from ``/proc`` anyway). So hashing the bytes would check nothing the
operating system does not, and it was the largest cost of a same-host round trip: a PS push
and reply passed over every byte four times for it (measured: sync PS / AllReduce at N=4 on
two cores 0.84 -> 0.96, medians of back-to-back pairs; see the README).

One memory copy on each side (none on the reading side with views, none on the writing side
for a frame built in :meth:`Lane.reserve` space) replaces the TCP loopback path (a copy into
the kernel, a copy out of it, and the I/O threads' wake-ups). A lane never blocks: a frame
that does not fit in its free space travels inline through the socket. Positions are 64-bit
byte counters in the lane's header; the writer claims space before filling it, and the reader
reads a frame only once a socket message names it (the data is written before that send, a
full barrier); lanes are used only where :meth:`Lane.available` says so. Files are created
``0600`` and unlinked as soon as the server has mapped them, so nothing leaks and no other
process can open them.

A *shared* lane (:meth:`Lane.create_shared`) has one writer (a server) and several readers
(its same-host clients), for a reply that goes to all of them: its file is unlinked at once
and readers open it through ``/proc/<pid>/fd/<fd>`` (this user's processes only). Each reader
reports how far it has read in its own up lane's header; the writer frees space below the
least of what its readers still hold. As for any lane, the MAC covers a frame's place; the
ones who could write there are the server and its authenticated clients, who could send any
bytes anyway.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np

from concord.comm.shm import HEADER, ShmRing, _map, _shm_dir
from concord.comm.wire import MAC_BYTES, Codec, LaneRef

LANE_BYTES = 16 << 20  # capacity of one lane
MIN_FRAME_BYTES = 64 << 10  # smaller frames stay inline (the socket is as fast for them)
MAX_LANE_BYTES = 1 << 30
PREFIX = "concord-lane-"
_WRITTEN, _READ = 0, 8  # int64 slots of the header: bytes ever written / ever released
_ACK = 16  # int64 slot of a client's up lane: bytes of its server's shared lane it freed
_SHARED_PATH = re.compile(r"/proc/\d+/fd/\d+")
_TOKEN = slice(256, 272)  # header bytes: a shared lane's random name (readers check it)
_ALIGN = 64  # frames start on cache-line boundaries (LANE_BYTES is a multiple)


class LaneError(ValueError):
    """A lane descriptor that does not fit the lane (a peer bug or a forged message)."""


class Lane:
    """One direction of shared memory between two processes (see the module docstring)."""

    def __init__(self, path: str, capacity: int, create: bool, prefault: bool = True) -> None:
        if not 0 < capacity <= MAX_LANE_BYTES:
            raise ValueError(f"lane capacity must be in 1..{MAX_LANE_BYTES}, got {capacity}")
        self.path, self.capacity = path, capacity
        self._mem = _map(path, HEADER + capacity, create)
        self._counters = np.frombuffer(self._mem, dtype=np.int64, count=3 * 8)
        self._data = np.frombuffer(self._mem, dtype=np.uint8, offset=HEADER)
        if create:
            self._counters[_ACK] = -1  # (an up lane's) no shared lane mapped
        if prefault:  # fault every page in now (before any frame is written, so nothing is
            # overwritten): otherwise each of the first messages pays for fresh pages
            self._data[:: mmap.PAGESIZE] = 0
        self._acks: np.ndarray | None = None  # a shared lane's reader: where release() tells
        self._fd: int | None = None  # a shared lane's writer: keeps the unlinked file
        self.share_path = ""
        self._next = 0  # reader: where the next frame may start (all before it may be freed)
        self._reserved: dict[int, tuple[int, int]] = {}  # writer: address -> (position, size)
        self._placed = -1  # writer: the position :meth:`put` returned last
        self._closed = False
        self.moved = 0  # bytes this side put into (writer) or took from (reader) the lane

    @staticmethod
    def available() -> bool:
        """Whether lanes may be used on this platform (the shared-memory rules of the ring)."""
        return ShmRing.available(2 * (HEADER + LANE_BYTES))

    @classmethod
    def create(cls, capacity: int = LANE_BYTES) -> Lane:
        path = os.path.join(_shm_dir(), PREFIX + secrets.token_hex(12))
        return cls(path, capacity, create=True)

    @classmethod
    def attach(cls, path: str, capacity: int) -> Lane:
        """Map a lane a peer created; ``path`` must name a lane file in the shm folder."""
        name = os.path.basename(path)
        if os.path.dirname(path) != _shm_dir() or not name.startswith(PREFIX) or "/" in name:
            raise ValueError(f"not a concord lane path: {path!r}")
        if os.path.getsize(path) != HEADER + capacity:
            raise ValueError(f"lane {path} is not {capacity} bytes")
        return cls(path, capacity, create=False)

    @classmethod
    def create_shared(cls, capacity: int = LANE_BYTES) -> Lane:
        """A lane one writer shares with several readers on its host. Its file is unlinked at
        once; readers open it through :attr:`share_path` (``/proc/<pid>/fd/<fd>``, which only
        this user's processes may open), so nothing is left behind even if this one dies."""
        lane = cls.create(capacity)
        try:
            lane._fd = os.open(lane.path, os.O_RDWR)
        except OSError:
            lane.close()
            raise
        finally:
            lane.unlink()
        lane.share_path = f"/proc/{os.getpid()}/fd/{lane._fd}"
        lane._mem[_TOKEN] = secrets.token_bytes(16)
        return lane

    @property
    def token(self) -> str:
        """A shared lane's random name, which its readers check after mapping it."""
        return self._mem[_TOKEN].hex()

    @classmethod
    def attach_shared(cls, path: str, capacity: int, acks: Lane, token: str) -> Lane:
        """Map a shared lane as one of its readers: :meth:`release` then reports what this
        reader freed in the header of ``acks`` (its own up lane, which the writer reads).
        ``token`` must match (e.g. a path from another pid namespace names another file)."""
        if not _SHARED_PATH.fullmatch(path):
            raise ValueError(f"not a shared lane path: {path!r}")
        if os.path.getsize(path) != HEADER + capacity:
            raise ValueError(f"shared lane {path} is not {capacity} bytes")
        lane = cls(path, capacity, create=False, prefault=False)  # (it may hold live frames)
        if lane.token != token:
            lane.close()
            raise ValueError(f"{path} is not the shared lane its server named")
        lane._acks = acks._counters
        lane._next = int(lane._counters[_WRITTEN])  # frames before this one are not for it
        acks._counters[_ACK] = lane._next
        return lane

    @property
    def acked(self) -> int:
        """(An up lane's) bytes of the server's shared lane its client freed; -1: unmapped."""
        return int(self._counters[_ACK])

    @property
    def written(self) -> int:
        """Bytes ever claimed by the writer (the position after the last frame)."""
        return int(self._counters[_WRITTEN])

    @property
    def room(self) -> int:
        """(Writer) free bytes, wherever they are in the ring."""
        return self.capacity - self.written + int(self._counters[_READ])

    def free_to(self, position: int) -> None:
        """(A shared lane's writer) no reader needs anything before ``position`` any more."""
        self._counters[_READ] = position

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- writer -----------------------------------------------------------------------------
    def put(self, frame: Any) -> int | None:
        """Copy ``frame`` into the lane; its position, or None when it does not fit now. A
        frame built in space from :meth:`reserve` is published where it is, without a copy."""
        view = memoryview(frame).cast("B")
        n = view.nbytes
        if self._reserved and n:
            hit = self._reserved.pop(np.frombuffer(view, dtype=np.uint8).ctypes.data, None)
            if hit is not None and hit[1] == n and hit[0] > self._placed:  # in order: as is
                self.moved += n
                self._placed = hit[0]
                return hit[0]
        start = self._claim(n)
        if start is None:
            return None
        offset = start % self.capacity
        self._data[offset : offset + n] = np.frombuffer(view, dtype=np.uint8)
        self.moved += n
        self._placed = start
        return start

    def reserve(self, nbytes: int) -> np.ndarray | None:
        """Writable lane space for a frame of ``nbytes`` to be built in place (e.g. a tensor
        packed straight into the lane); :meth:`put` of that memory then costs no copy. None
        when it does not fit now. Space reserved and never put is freed with what follows."""
        start = self._claim(nbytes)
        if start is None or nbytes == 0:
            return None
        offset = start % self.capacity
        space = self._data[offset : offset + nbytes]
        if len(self._reserved) > 64:  # reservations never put (a failed send): forget them
            self._reserved.clear()
        self._reserved[space.ctypes.data] = (start, nbytes)
        return space

    def _claim(self, n: int) -> int | None:
        """The position of ``n`` free bytes, now taken (None when they do not fit now)."""
        written, released = int(self._counters[_WRITTEN]), int(self._counters[_READ])
        start = -(-written // _ALIGN) * _ALIGN  # aligned for tensors read or built in place
        if start % self.capacity + n > self.capacity:  # no wrap inside a frame: skip the tail
            start += self.capacity - start % self.capacity
        if n > self.capacity or start + n - released > self.capacity:
            return None
        self._counters[_WRITTEN] = start + n  # published before the bytes: a reader reads
        return start  # only what a later socket message names

    # -- reader -----------------------------------------------------------------------------
    def take(self, position: int, nbytes: int) -> np.ndarray:
        """Copy out the frame at ``position`` and free its space, with that of every frame
        viewed before it (frames come in order)."""
        out = self.view(position, nbytes).copy()
        self.release()
        return out

    def view(self, position: int, nbytes: int) -> np.ndarray:
        """The frame at ``position`` in place (no copy); its space stays taken until
        :meth:`release`, so the writer cannot reuse it while the view is read."""
        offset = position % self.capacity if position >= 0 else -1
        written = int(self._counters[_WRITTEN])
        if position < self._next or offset < 0 or offset + nbytes > self.capacity:
            raise LaneError(f"lane descriptor ({position}, {nbytes}) is out of bounds")
        if position + nbytes > written or nbytes < 0:
            raise LaneError(f"lane descriptor ({position}, {nbytes}) was never written")
        self._next = position + nbytes
        self.moved += nbytes
        return self._data[offset : offset + nbytes]

    def release(self) -> None:
        """Free every frame viewed so far for the writer (views of them must be dead)."""
        if self._closed:
            return
        if self._acks is not None:  # a reader of a shared lane: its writer takes the minimum
            self._acks[_ACK] = self._next
        else:
            self._counters[_READ] = self._next

    def close(self) -> None:
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        del self._counters, self._data, self._acks
        try:
            self._mem.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass


# -- socket frames --------------------------------------------------------------------------
LANE_MARK = b"concord-lane/3"  # starts the head frame of a message with buffers in a lane
SHARED_MARK = b"concord-lane/S"  # ... in the sender's shared lane (a broadcast reply)
_COUNT = 8  # bytes of the map's entry count after the mark


def socket_frames(frames: list[Any]) -> list[Any]:
    """What goes on the socket for signed codec frames ``[mac, header, *buffers]`` with no
    lane: one head frame, ``mac || header``, then the buffers."""
    return [bytes(frames[0]) + bytes(frames[1]), *frames[2:]]


def pack_frames(
    codec: Codec,
    header: bytes,
    buffers: list[Any],
    lane: Lane | None,
    shared: bool = False,
    min_bytes: int | None = None,
    inline_mac: Callable[[], bytes] | None = None,
) -> list[Any]:
    """What goes on the socket for a message's unsigned frames (:meth:`Codec.body`): as
    :func:`socket_frames`, but with ``lane`` each buffer of ``min_bytes`` or more (default
    :data:`MIN_FRAME_BYTES`) that fits moves into it, the MAC covering its place
    (:class:`~concord.comm.wire.LaneRef`) instead of its bytes, and the head becomes
    ``LANE_MARK || n || map || mac || header`` (``SHARED_MARK`` when ``lane`` is the sender's
    shared lane), where ``map`` lists ``(buffer index, lane position, bytes)`` as ``n`` int64
    triples. ``inline_mac()`` signs a message none of whose buffers moved (default: sign it
    here; a sender of one message to several peers signs it once)."""
    min_bytes = MIN_FRAME_BYTES if min_bytes is None else min_bytes
    placed: list[int] = []
    signed: list[Any] = []
    inline = []
    for i, buf in enumerate(buffers):
        nbytes = memoryview(buf).nbytes
        position = lane.put(buf) if lane is not None and nbytes >= min_bytes else None
        if position is None:
            inline.append(buf)
            signed.append(buf)
        else:
            placed += [i, position, nbytes]
            signed.append(LaneRef(shared, position, nbytes))
    if not placed:
        mac = inline_mac() if inline_mac is not None else codec.sign(header, buffers)
        return socket_frames([mac, header, *buffers])
    count = (len(placed) // 3).to_bytes(_COUNT, "little")
    mark = SHARED_MARK if shared else LANE_MARK
    table = np.array(placed, dtype=np.int64).tobytes()
    return [mark + count + table + codec.sign(header, signed) + bytes(header), *inline]


def unpack_frames(
    frames: list[Any], lane: Lane | None, copy: bool = True, shared: Lane | None = None
) -> tuple[list[Any], dict[int, LaneRef]]:
    """The codec frames ``[mac, header, *buffers]`` of a message as it came off the socket,
    and the place of each buffer (by index) that came through a lane (for
    :meth:`Codec.decode`): large buffers copied out of ``lane`` or, for a head with
    ``SHARED_MARK``, the sender's ``shared`` lane (with ``copy=False``: views, whose space
    the caller frees with ``release()`` once they are dead). A head too short for a MAC
    yields a short MAC frame, which the codec rejects. Raises :class:`LaneError` for a map
    that does not fit the message or the lane."""
    if not frames:
        return [b"", b""], {}
    head = memoryview(frames[0]).cast("B")
    inline = frames[1:]
    mark = head[: len(LANE_MARK)]
    if mark == SHARED_MARK:
        lane = shared
    elif mark != LANE_MARK:
        return [head[:MAC_BYTES], head[MAC_BYTES:], *inline], {}
    if lane is None:
        raise LaneError("a shared-memory lane message from a peer that has no lane")
    start = len(LANE_MARK) + _COUNT
    count = int.from_bytes(head[len(LANE_MARK) : start], "little")
    stop = start + 24 * count
    if count < 1 or stop > head.nbytes:
        raise LaneError("malformed lane map")
    triples = np.frombuffer(head[start:stop], dtype=np.int64).reshape(-1, 3).tolist()
    rest, buffers, places = head[stop:], [], {}
    pending = iter(inline)
    for index, position, nbytes in triples:
        if index < len(buffers) or index >= len(inline) + count:
            raise LaneError(f"lane map names buffer {index} out of order or past the end")
        while len(buffers) < index:
            buffers.append(next(pending, None))
            if buffers[-1] is None:
                raise LaneError(f"lane map names buffer {index} past the message's end")
        buffers.append(lane.take(position, nbytes) if copy else lane.view(position, nbytes))
        places[index] = LaneRef(mark == SHARED_MARK, position, nbytes)
    buffers.extend(pending)
    return [rest[:MAC_BYTES], rest[MAC_BYTES:], *buffers], places
