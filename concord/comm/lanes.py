"""Shared-memory lanes: a same-host shortcut for the bulk frames of wire messages.

A :class:`Lane` is a one-way byte ring in a shared-memory file with one writer and one reader.
When a client and its server share a host (and ``/dev/shm``), the client creates two lanes
(up and down) and offers them to the server (op ``lanes``); from then on a large buffer frame
is copied into the lane and the ZeroMQ message carries its (frame index, lane position,
length) in its place. The receiver copies the bytes out into its own memory and frees the
lane space (or, where the caller asks for views, reads them in place and frees the space once
it is done), and hands the restored frames to :class:`~concord.comm.wire.Codec`, which
checks the MAC over them exactly as if they had come through the socket: the MAC, the header
and every check are unchanged. Reading in place after the check trusts no one new: once both
ends have mapped a lane its file is gone, so only the authenticated peer (which could send any
bytes anyway) can still write there, and it never reuses space the reader has not freed.

One memory copy on each side (none on the reading side with views) replaces the TCP loopback
path (a copy into the kernel, a copy out of it, and the I/O threads' wake-ups). A lane never
blocks: a frame that does not fit in its free space travels inline through the socket.
Positions are 64-bit byte counters in the lane's header, written after the data they publish
(x86-64 keeps stores in order, and every descriptor reaches the reader through a socket send,
a full barrier); lanes are used only where :meth:`Lane.available` says so. Files are created
``0600`` and unlinked as soon as the server has mapped them, so nothing leaks and no other
process can open them.
"""

from __future__ import annotations

import mmap
import os
import secrets
from typing import Any

import numpy as np

from concord.comm.shm import HEADER, ShmRing, _map, _shm_dir
from concord.comm.wire import MAC_BYTES

LANE_BYTES = 16 << 20  # capacity of one lane
MIN_FRAME_BYTES = 64 << 10  # smaller frames stay inline (the socket is as fast for them)
MAX_LANE_BYTES = 1 << 30
PREFIX = "concord-lane-"
_WRITTEN, _READ = 0, 8  # int64 slots of the header: bytes ever written / ever released


class LaneError(ValueError):
    """A lane descriptor that does not fit the lane (a peer bug or a forged message)."""


class Lane:
    """One direction of shared memory between two processes (see the module docstring)."""

    def __init__(self, path: str, capacity: int, create: bool) -> None:
        if not 0 < capacity <= MAX_LANE_BYTES:
            raise ValueError(f"lane capacity must be in 1..{MAX_LANE_BYTES}, got {capacity}")
        self.path, self.capacity = path, capacity
        self._mem = _map(path, HEADER + capacity, create)
        self._counters = np.frombuffer(self._mem, dtype=np.int64, count=2 * 8)
        self._data = np.frombuffer(self._mem, dtype=np.uint8, offset=HEADER)
        # fault every page in now (before any frame is written, so nothing is overwritten):
        # otherwise each of the first messages through the lane pays for fresh pages
        self._data[:: mmap.PAGESIZE] = 0
        self._next = 0  # reader: where the next frame may start (all before it may be freed)
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

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- writer -----------------------------------------------------------------------------
    def put(self, frame: Any) -> int | None:
        """Copy ``frame`` into the lane; its position, or None when it does not fit now."""
        view = memoryview(frame).cast("B")
        n = view.nbytes
        written, released = int(self._counters[_WRITTEN]), int(self._counters[_READ])
        start = written
        if start % self.capacity + n > self.capacity:  # no wrap inside a frame: skip the tail
            start += self.capacity - start % self.capacity
        if n > self.capacity or start + n - released > self.capacity:
            return None
        offset = start % self.capacity
        self._data[offset : offset + n] = np.frombuffer(view, dtype=np.uint8)
        self._counters[_WRITTEN] = start + n
        self.moved += n
        return start

    # -- reader -----------------------------------------------------------------------------
    def take(self, position: int, nbytes: int) -> np.ndarray:
        """Copy out the frame at ``position`` and free its space (frames come in order)."""
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
        if not self._closed:
            self._counters[_READ] = self._next

    def close(self) -> None:
        self._closed = True
        del self._counters, self._data
        try:
            self._mem.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass


# -- frames ---------------------------------------------------------------------------------
LANE_MARK = b"concord-lane/1"  # starts the first frame of a message with frames in a lane


def to_lane(frames: list[Any], lane: Lane) -> list[Any]:
    """``[mac, header, *buffers]`` with each large buffer that fits moved into ``lane``:
    ``[LANE_MARK + map, mac, header, *buffers left inline]`` where ``map`` lists
    ``(frame index, lane position, bytes)`` as int64 triples."""
    placed: list[int] = []
    inline = list(frames[:2])
    for i in range(2, len(frames)):
        nbytes = memoryview(frames[i]).nbytes
        position = lane.put(frames[i]) if nbytes >= MIN_FRAME_BYTES else None
        if position is None:
            inline.append(frames[i])
        else:
            placed += [i, position, nbytes]
    if not placed:
        return frames
    return [LANE_MARK + np.array(placed, dtype=np.int64).tobytes(), *inline]


def from_lane(frames: list[Any], lane: Lane | None, copy: bool = True) -> list[Any]:
    """The frames as sent (``[mac, header, *buffers]``), large ones copied out of ``lane``
    (with ``copy=False``: views of it, whose space the caller frees with ``lane.release()``
    once they are dead). Raises :class:`LaneError` for a map that does not fit the message
    or the lane."""
    if not frames or len(frames[0]) == MAC_BYTES:
        return frames
    first = memoryview(frames[0]).cast("B")
    if first[: len(LANE_MARK)] != LANE_MARK:
        return frames
    if lane is None:
        raise LaneError("a shared-memory lane message from a peer that has no lane")
    table = first[len(LANE_MARK) :]
    if not table.nbytes or table.nbytes % 24:
        raise LaneError("malformed lane map")
    triples = np.frombuffer(table, dtype=np.int64).reshape(-1, 3).tolist()
    inline = iter(frames[1:])
    out: list[Any] = []
    for index, position, nbytes in triples:
        if index < max(2, len(out)):
            raise LaneError(f"lane map names frame {index} out of order")
        while len(out) < index:
            out.append(next(inline, None))
            if out[-1] is None:
                raise LaneError(f"lane map names frame {index} past the message's end")
        out.append(lane.take(position, nbytes) if copy else lane.view(position, nbytes))
    out.extend(inline)
    return out
