"""Multi-part messages: a large message travels as several authenticated wire messages.

Hashing and sending are then pipelined: while ZeroMQ's I/O thread moves part ``k``, the
sender authenticates part ``k+1`` and the receiver checks part ``k-1``, instead of every byte
being hashed before the first one leaves and after the last one arrives. Parts of at most
:data:`PART_BYTES` also keep every receive buffer under glibc's mmap threshold (a 64 MB frame
page-faults its whole fresh buffer on every receive).

Each part is a complete message of :mod:`concord.comm.wire` (its own MAC, header and version)
holding whole tensors, so a received part decodes without copies. The parts of one message
repeat its ``op``, ``worker`` and ``step``; part 0 carries the caller's ``meta``; every part
carries ``meta["part"] = [message id, index, count]``. A tensor larger than a part travels in
a part of its own. Parts of a message arrive in order (one ZeroMQ connection keeps order).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from concord.comm.wire import Message, WireError

PART_BYTES = 4 << 20
PART_KEY = "part"


def split_message(msg: Message, msg_id: int, part_bytes: int = PART_BYTES) -> list[Message]:
    """``msg`` as its parts (``[msg]`` when it fits in one part)."""
    if part_bytes < 1:
        raise ValueError(f"part_bytes must be positive, got {part_bytes}")
    if PART_KEY in msg.meta:
        raise ValueError(f"meta key {PART_KEY!r} is reserved for multi-part messages")
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in msg.tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > part_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = tensor
        size += nbytes
    if len(groups) == 1:
        return [msg]
    return [
        replace(
            msg,
            meta=(msg.meta if i == 0 else {}) | {PART_KEY: [msg_id, i, len(groups)]},
            tensors=group,
        )
        for i, group in enumerate(groups)
    ]


@dataclass
class _Open:
    msg: Message
    msg_id: int
    count: int
    next: int
    nbytes: int


@dataclass
class PartAssembler:
    """Joins the parts of each sender's multi-part messages (``max_bytes`` bounds a whole one).

    ``add`` returns the complete message, or None while parts are still due. A part that does
    not fit its sender's open message raises :class:`WireError` once; the rest of that message
    is then swallowed (None), so the sender gets one error reply per message.
    """

    max_bytes: int
    _open: dict[bytes, _Open] = field(default_factory=dict)
    _skip: dict[bytes, int] = field(default_factory=dict)

    def add(self, sender: bytes, msg: Message) -> Message | None:
        part = msg.meta.get(PART_KEY)
        if part is None:
            if sender in self._open:
                self.drop(sender)
                raise WireError("frames", "a message came before the previous one's last part")
            return msg
        msg_id, index, count = _check(part)
        if self._skip.get(sender) == msg_id:
            if index == count - 1:
                del self._skip[sender]
            return None
        try:
            return self._add_part(sender, msg, msg_id, index, count)
        except WireError:
            self.drop(sender)
            if index < count - 1:
                self._skip[sender] = msg_id
            raise

    def drop(self, sender: bytes) -> None:
        """Forget ``sender``'s unfinished message (a bad part, or the sender is gone)."""
        self._open.pop(sender, None)
        self._skip.pop(sender, None)

    def _add_part(
        self, sender: bytes, msg: Message, msg_id: int, index: int, count: int
    ) -> Message | None:
        current = self._open.get(sender)
        if index == 0:
            if current is not None:
                raise WireError("frames", "a new multi-part message began before the last ended")
            meta = {k: v for k, v in msg.meta.items() if k != PART_KEY}
            self._open[sender] = _Open(replace(msg, meta=meta), msg_id, count, 1, msg.nbytes)
            return None
        if current is None or (current.msg_id, current.next, current.count) != (
            msg_id,
            index,
            count,
        ):
            raise WireError(
                "frames", f"part {index} of {count} of message {msg_id} is out of order"
            )
        whole = current.msg
        if (msg.op, msg.worker, msg.step) != (whole.op, whole.worker, whole.step):
            raise WireError("frames", f"part {index} of message {msg_id} changes op/worker/step")
        if set(msg.tensors) & set(whole.tensors):
            raise WireError("header", f"part {index} of message {msg_id} repeats a buffer key")
        current.nbytes += msg.nbytes
        if current.nbytes > self.max_bytes:
            raise WireError("oversize", f"message {msg_id} exceeds {self.max_bytes} bytes")
        whole.tensors.update(msg.tensors)
        current.next += 1
        if current.next < count:
            return None
        del self._open[sender]
        return whole


def _check(part: object) -> tuple[int, int, int]:
    ok = (
        isinstance(part, list)
        and len(part) == 3
        and all(type(v) is int for v in part)
        and 0 <= part[1] < part[2]
        and part[2] >= 2
    )
    if not ok:
        raise WireError("header", f"bad part marker {part!r}")
    return part[0], part[1], part[2]
