"""Forward a child's stdout/stderr to the launcher's, each line prefixed with ``[role rank]``.

Lines end at ``\\n`` or ``\\r`` (so a progress bar that redraws with ``\\r`` stays live and
keeps its prefix). Text without an ending is held back until its ending arrives (or 64 KiB
pile up, or the pipe closes), so lines of different processes never mix.
"""

from __future__ import annotations

import re
import sys
import threading
from typing import IO

_LOCK = threading.Lock()
_ENDINGS = re.compile(rb"(\r\n|\n|\r)")
_HOLD_LIMIT = 64 * 1024


def _write(stream_name: str, data: bytes) -> None:
    """Write to the launcher's current stdout/stderr (looked up per call: tests swap them)."""
    stream = sys.stdout if stream_name == "stdout" else sys.stderr
    try:
        with _LOCK:
            buffer = getattr(stream, "buffer", None)
            if buffer is not None:
                buffer.write(data)
                buffer.flush()
            else:
                stream.write(data.decode("utf-8", errors="replace"))
                stream.flush()
    except (OSError, ValueError):
        pass  # our own output is gone (closed pipe): keep draining so the child never blocks


class _Prefixer:
    """Turns a byte stream into prefixed, complete lines."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.held = b""
        self.after_cr = False  # last emitted piece ended with a lone "\r"

    def feed(self, chunk: bytes) -> bytes:
        parts = _ENDINGS.split(self.held + chunk)
        self.held = parts.pop()  # text after the last ending (maybe empty)
        out = []
        for text, ending in zip(parts[0::2], parts[1::2]):
            if self.after_cr and not text and ending == b"\n":
                out.append(ending)  # the "\n" of a "\r\n" that was split across two reads
            else:
                out.append(self.prefix + text + ending)
            self.after_cr = ending == b"\r"
        if len(self.held) > _HOLD_LIMIT:
            out.append(self.prefix + self.held + b"\n")
            self.held, self.after_cr = b"", False
        return b"".join(out)

    def close(self) -> bytes:
        rest = self.prefix + self.held + b"\n" if self.held else b""
        self.held = b""
        return rest


def _pump(pipe: IO[bytes], prefix: bytes, stream_name: str) -> None:
    prefixer = _Prefixer(prefix)
    try:
        while True:
            chunk = pipe.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                break
            data = prefixer.feed(chunk)
            if data:
                _write(stream_name, data)
    except (OSError, ValueError):
        pass
    finally:
        rest = prefixer.close()
        if rest:
            _write(stream_name, rest)
        pipe.close()


def forward(pipe: IO[bytes], name: str, stream_name: str) -> threading.Thread:
    """Start a daemon thread copying ``pipe`` to the launcher's ``stream_name`` with ``[name] ``."""
    thread = threading.Thread(
        target=_pump,
        args=(pipe, f"[{name}] ".encode(), stream_name),
        name=f"concord-{name}-{stream_name}",
        daemon=True,
    )
    thread.start()
    return thread
