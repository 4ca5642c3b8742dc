"""The wire format: a small JSON header plus raw tensor frames, authenticated with a MAC.

A message is the frames ``[mac, header, buf0, buf1, ...]`` (on the socket the MAC and the
header share one frame, see :func:`concord.comm.lanes.pack_frames`):

- ``header`` is compact JSON: ``{"version", "op", "worker", "step", "meta", "buffers"}``
  where each buffer entry is ``{"key", "dtype", "shape", "chunks"}`` and ``meta`` is a small
  JSON map for the caller's own fields. Nothing is ever unpickled.
- each tensor travels as its raw bytes, split into ``chunks`` frames of at most
  ``chunk_bytes`` (256 MiB by default, so most tensors are one frame and decode without a copy).
- ``mac`` is ``nonce || tag``: 16 fresh random bytes, and a GMAC (AES-256-GCM with no
  plaintext) under the one-time key ``K = HMAC-SHA256(secret, TAG || nonce)``. Every frame
  ``F_i`` (the header is frame 0) gets its own tag ``T_i = GMAC_K(IV=i, F_i)``; the message
  tag is ``GMAC_K(IV=2**95, n || len(F_0) || T_0 || ... || len(F_n-1) || T_n-1)``. IVs never
  repeat under a key and a key serves one message, as GMAC requires. Every byte of every
  frame is authenticated at 5-17 GB/s on one core (AES-NI and carry-less multiply through
  OpenSSL), where HMAC-SHA256 over the bytes managed 1.8 GB/s and Poly1305 ~10 GB/s. A
  message whose frames hold at most :data:`HMAC_BYTES` (a control message, or a push whose
  tensors went into a lane) is signed by one HMAC-SHA256 instead, the first 16 bytes of
  ``HMAC-SHA256(secret, HMAC_TAG || nonce || n || len(F_0) || F_0 || ...)``: the same
  sizes pick the same scheme on both ends, the two tags (equal length, different) keep the
  schemes' inputs apart, and one hash costs half the key derivation, two AES calls and the
  summary (4.8 -> 3.6 us per signature here, 7.7 -> 5.9 us on flushed caches). The receiver checks
  the tag in constant time *before* it parses anything.
- a buffer that travels in a same-host shared-memory lane (:mod:`concord.comm.lanes`) is
  authenticated by its place instead of its bytes: its entry in the summary is
  ``2**63 + len(F_i) || shared || position`` (a :class:`LaneRef`; no tag). Only the
  authenticated peer can write that memory (see the lanes module), so hashing it would check
  nothing the operating system does not already guarantee, and it cost a PS round trip four
  passes over every byte.

Checks on receipt (each a :class:`WireError` with a ``kind``): frame count and sizes, the MAC,
the header's JSON and fields, the protocol version, dtype allow-list, shape versus byte count,
and the size limit. Decoded tensors share the received frames' memory (no copy) unless a
tensor was chunked, which is reassembled with one copy.

This module knows nothing of sockets; :mod:`concord.comm.channel` moves the frames.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from concord.errors import PeerTimeoutError, ProtocolError

PROTOCOL_VERSION = 6
NONCE_BYTES = 16
MAC_BYTES = NONCE_BYTES + 16  # nonce || tag (GMAC, or HMAC-SHA256 cut to 16 bytes)
CHUNK_BYTES = 256 << 20
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_BYTES = 4 << 30
_TAG = b"concord-wire/3 gmac key"
_HMAC_TAG = b"concord-wire/3 hmac all"  # (as long as _TAG, and not it)
HMAC_BYTES = 4096  # frames of at most this many bytes in all: one HMAC (module docstring)
_SUMMARY_IV = (1 << 95).to_bytes(12, "little")  # never a frame index
_IN_LANE = 1 << 63  # marks a lane buffer's length in the summary (no frame is that long)
# made once (json.dumps with options builds an encoder per call: ~0.6 us a header); both
# keep no state between calls, so threads may share them
_JSON_OUT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_JSON_IN = json.JSONDecoder()

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_HEADER_KEYS = {"version", "op", "worker", "step", "meta", "buffers"}


class WireError(ProtocolError):
    """A message failed a wire check. ``kind`` is one of: frames, auth, header, version,
    dtype, shape, oversize, remote (an error reply from the peer)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Message:
    """One wire message: an operation name, who sent it, and named tensors.

    ``worker`` and ``step`` are integers (-1 when unused); ``meta`` holds small JSON values
    (numbers, strings, lists, maps); ``tensors`` maps keys to CPU tensors, sent in order.
    """

    op: str
    worker: int = -1
    step: int = -1
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor payload."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def as_wire_error(exc: Exception) -> WireError:
    """``exc`` as a WireError: a ValueError from parts or lanes is a malformed frame."""
    return exc if isinstance(exc, WireError) else WireError("frames", str(exc))


def error_message(kind: str, text: str, **meta: Any) -> Message:
    """The reply a server sends for a request it rejects (``op="error"``)."""
    return Message(op="error", meta={"kind": kind, "error": text, **meta})


def raise_if_error(msg: Message, peer: str) -> Message:
    """Raise if ``msg`` is an error reply from ``peer``: PeerTimeoutError when the peer itself
    gave up waiting on someone (kind ``timeout``), else :class:`WireError` (kind ``remote``)."""
    if msg.op == "error":
        kind = msg.meta.get("kind", "?")
        if kind == "timeout":
            raise PeerTimeoutError(f"{peer} reports: {msg.meta.get('error')}")
        raise WireError("remote", f"{peer} rejected the request ({kind}): {msg.meta.get('error')}")
    return msg


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype`` (TypeError if it cannot travel)."""
    if dtype not in _NAMES:
        raise TypeError(f"dtype {dtype} cannot be sent; allowed: {list(DTYPES)}")
    return _NAMES[dtype]


@dataclass(frozen=True)
class LaneRef:
    """Where a buffer frame lies in a shared-memory lane: ``shared`` (the sender's lane for
    replies to several clients) or not (the lane of this sender and receiver), its position
    and length. The MAC covers this in place of the frame's bytes (module docstring)."""

    shared: bool
    position: int
    nbytes: int

    def summary(self) -> bytes:
        if not (0 <= self.position < _IN_LANE and 0 <= self.nbytes < _IN_LANE):
            raise ValueError(f"lane place out of range: {self}")
        return (
            (_IN_LANE | self.nbytes).to_bytes(8, "little")
            + bytes([self.shared])
            + self.position.to_bytes(8, "little")
        )


def compute_mac(
    secret: bytes, header: Any, buffers: Sequence[Any], nonce: bytes | None = None
) -> bytes:
    """The MAC frame ``nonce || tag`` of a message (see the module docstring); ``nonce`` is
    16 fresh random bytes unless given. A :class:`LaneRef` among ``buffers`` stands for a
    frame in a lane."""
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    keyed = _keyed(secret).copy()  # HMAC-SHA256 with the secret's pads already hashed
    frames = [header, *buffers]
    small = sum(_len(f) for f in frames if not isinstance(f, LaneRef)) <= HMAC_BYTES
    if not small:
        keyed.update(_TAG + nonce)
        gmac = AESGCM(keyed.digest())  # a one-time AES-256 key
    summary = [len(frames).to_bytes(8, "little")]
    for index, frame in enumerate(frames):  # a distinct IV for every frame under this key
        if isinstance(frame, LaneRef):  # (the header, frame 0, never is)
            summary.append(frame.summary())
            continue
        summary.append(_len(frame).to_bytes(8, "little"))
        summary.append(frame if small else gmac.encrypt(index.to_bytes(12, "little"), b"", frame))
    if small:  # one HMAC over the frames themselves
        keyed.update(b"".join([_HMAC_TAG, nonce, *summary]))
        return nonce + keyed.digest()[:16]
    return nonce + gmac.encrypt(_SUMMARY_IV, b"", b"".join(summary))


@functools.lru_cache(maxsize=8)
def _keyed(secret: bytes) -> hmac.HMAC:
    return hmac.new(secret, digestmod=hashlib.sha256)


def verify_mac(secret: bytes, mac: Any, header: Any, buffers: Sequence[Any]) -> bool:
    """True if ``mac`` (a MAC frame) authenticates ``header`` and ``buffers``; constant time."""
    nonce = bytes(mac[:NONCE_BYTES])
    return hmac.compare_digest(compute_mac(secret, header, buffers, nonce), bytes(mac))


def _len(buf: Any) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def _as_bytes_view(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of a CPU tensor (copied only if it is not contiguous)."""
    if tensor.device.type != "cpu":
        raise TypeError(f"wire tensors must be on the CPU, got one on {tensor.device}")
    if not tensor.numel():
        return memoryview(b"")
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.dim() != 1 or not tensor.is_contiguous():
        tensor = tensor.contiguous().reshape(-1)
    return memoryview(tensor.view(torch.uint8).numpy())


class Codec:
    """Encodes and decodes authenticated messages with one job secret.

    ``max_bytes`` bounds a message's tensor payload (a larger one is refused on both ends);
    ``chunk_bytes`` is the largest frame a tensor is sent in.
    """

    def __init__(
        self,
        secret: bytes,
        max_bytes: int = DEFAULT_MAX_BYTES,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ValueError(
                "the wire secret must be at least 16 bytes; concord run sets CONCORD_SECRET, or "
                "export CONCORD_SECRET=$(python -c 'import secrets;print(secrets.token_hex(32))')"
            )
        if chunk_bytes < 1 or max_bytes < 0:
            raise ValueError(f"bad limits: chunk_bytes={chunk_bytes}, max_bytes={max_bytes}")
        self._secret = secret
        self.max_bytes = max_bytes
        self.chunk_bytes = chunk_bytes

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, msg: Message) -> list[Any]:
        """Frames ``[mac, header, *buffers]``; buffers are views of the tensors (no copy)."""
        header, buffers = self.body(msg)
        return [self.sign(header, buffers), header, *buffers]

    def sign(self, header: bytes, buffers: Sequence[Any]) -> bytes:
        """The MAC frame of ``header`` and ``buffers`` (a :class:`LaneRef` stands for a buffer
        that travels in a lane)."""
        return compute_mac(self._secret, header, buffers)

    def body(self, msg: Message) -> tuple[bytes, list[memoryview]]:
        """The header and buffer frames of ``msg``, not yet signed (see :meth:`sign`)."""
        if msg.nbytes > self.max_bytes:
            raise WireError(
                "oversize", f"message {msg.op!r} carries {msg.nbytes} bytes > {self.max_bytes}"
            )
        entries, frames = [], []
        for key, tensor in msg.tensors.items():
            if tensor.dtype not in _NAMES:
                raise TypeError(
                    f"tensor {key!r} has dtype {tensor.dtype}, not one of {list(DTYPES)}"
                )
            view = _as_bytes_view(tensor)
            chunks = [
                view[i : i + self.chunk_bytes] for i in range(0, view.nbytes, self.chunk_bytes)
            ]
            chunks = chunks or [view]
            frames.extend(chunks)
            entries.append(
                {
                    "key": str(key),
                    "dtype": _NAMES[tensor.dtype],
                    "shape": list(tensor.shape),
                    "chunks": len(chunks),
                }
            )
        header = {
            "version": PROTOCOL_VERSION,
            "op": msg.op,
            "worker": int(msg.worker),
            "step": int(msg.step),
            "meta": msg.meta,
            "buffers": entries,
        }
        raw = _JSON_OUT.encode(header).encode()
        if len(raw) > MAX_HEADER_BYTES:
            raise WireError("oversize", f"header of {msg.op!r} is {len(raw)} bytes")
        return raw, frames

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, frames: Sequence[Any], lanes: Mapping[int, LaneRef] | None = None) -> Message:
        """Check and parse frames (bytes, memoryviews or zmq Frames) into a Message; ``lanes``
        gives the place of each buffer (by index) that came through a lane.

        Raises :class:`WireError` on any failed check; nothing is parsed before the MAC passes.
        """
        views = [_view(f) for f in frames]
        if len(views) < 2:
            raise WireError("frames", f"a message has at least 2 frames, got {len(views)}")
        mac, header, buffers = views[0], views[1], views[2:]
        if mac.nbytes != MAC_BYTES:
            raise WireError("auth", f"MAC frame is {mac.nbytes} bytes, expected {MAC_BYTES}")
        if header.nbytes > MAX_HEADER_BYTES:
            raise WireError("oversize", f"header is {header.nbytes} bytes > {MAX_HEADER_BYTES}")
        total = sum(b.nbytes for b in buffers)
        if total > self.max_bytes:
            raise WireError("oversize", f"message carries {total} bytes > limit {self.max_bytes}")
        signed = [lanes.get(i, b) for i, b in enumerate(buffers)] if lanes else buffers
        if not verify_mac(self._secret, mac, header, signed):
            raise WireError("auth", "bad MAC: the sender does not hold this job's secret")
        head = _parse_header(header)
        return Message(
            op=head["op"],
            worker=head["worker"],
            step=head["step"],
            meta=head["meta"],
            tensors=self._tensors(head["buffers"], buffers),
        )

    def _tensors(self, entries: list[Any], buffers: list[memoryview]) -> dict[str, torch.Tensor]:
        wanted = 0
        for entry in entries:
            _check_entry(entry)
            wanted += entry["chunks"]
        if wanted != len(buffers):
            kind = "truncated" if wanted > len(buffers) else "extra"
            raise WireError(
                "frames", f"{kind} message: header lists {wanted} buffer frames, got {len(buffers)}"
            )
        out: dict[str, torch.Tensor] = {}
        pos = 0
        for entry in entries:
            key, dtype, shape = entry["key"], DTYPES[entry["dtype"]], entry["shape"]
            parts = buffers[pos : pos + entry["chunks"]]
            pos += entry["chunks"]
            expected = math.prod(shape) * dtype.itemsize
            got = sum(p.nbytes for p in parts)
            if got != expected:
                raise WireError(
                    "shape",
                    f"buffer {key!r}: {entry['dtype']} {shape} needs {expected} bytes, got {got}",
                )
            if key in out:
                raise WireError("header", f"buffer key {key!r} appears twice")
            out[key] = _tensor(parts, dtype, shape, expected)
        return out


def _view(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _parse_header(raw: memoryview) -> dict[str, Any]:
    try:
        head = _JSON_IN.decode(str(raw, "utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError("header", f"header is not JSON: {exc}") from None
    except RecursionError:  # (only a holder of the secret gets this far)
        raise WireError("header", "header JSON is nested too deeply") from None
    if not isinstance(head, dict) or set(head) != _HEADER_KEYS:
        got = sorted(head) if isinstance(head, dict) else type(head).__name__
        raise WireError("header", f"header must have keys {sorted(_HEADER_KEYS)}, got {got}")
    if head["version"] != PROTOCOL_VERSION:
        raise WireError(
            "version",
            f"protocol version {head['version']!r}, expected {PROTOCOL_VERSION}; "
            "run the same concord version on every process",
        )
    if not isinstance(head["op"], str) or not head["op"]:
        raise WireError("header", f"op must be a non-empty string, got {head['op']!r}")
    for name in ("worker", "step"):
        if type(head[name]) is not int:
            raise WireError("header", f"{name} must be an integer, got {head[name]!r}")
    if not isinstance(head["meta"], dict) or not isinstance(head["buffers"], list):
        raise WireError("header", "meta must be a map and buffers a list")
    return head


def _check_entry(entry: Any) -> None:
    if not isinstance(entry, dict) or set(entry) != {"key", "dtype", "shape", "chunks"}:
        raise WireError("header", f"bad buffer entry {entry!r}")
    if not isinstance(entry["key"], str):
        raise WireError("header", f"buffer key must be a string, got {entry['key']!r}")
    if entry["dtype"] not in DTYPES:
        raise WireError("dtype", f"buffer {entry['key']!r}: dtype {entry['dtype']!r} not allowed")
    shape = entry["shape"]
    if not isinstance(shape, list) or any(type(d) is not int or d < 0 for d in shape):
        raise WireError("shape", f"buffer {entry['key']!r}: bad shape {shape!r}")
    if type(entry["chunks"]) is not int or entry["chunks"] < 1:
        raise WireError("header", f"buffer {entry['key']!r}: bad chunk count {entry['chunks']!r}")


def _tensor(parts: list[memoryview], dtype: torch.dtype, shape: list[int], n: int) -> torch.Tensor:
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    if len(parts) == 1 and n >= 4096 and not parts[0].readonly:
        flat = torch.frombuffer(parts[0], dtype=dtype)
        return flat if len(shape) == 1 else flat.reshape(shape)
    out = torch.empty(n, dtype=torch.uint8)
    dest, pos = out.numpy(), 0
    for part in parts:
        dest[pos : pos + part.nbytes] = np.frombuffer(part, dtype=np.uint8)
        pos += part.nbytes
    return out.view(dtype).reshape(shape)
