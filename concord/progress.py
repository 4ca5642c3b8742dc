"""Progress bars that read well both in a terminal and behind the launcher's line prefixes."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm


class _LineStream:
    """Turns tqdm's carriage-return redraws into whole lines (for piped output)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        for part in text.replace("\r", "\n").split("\n"):
            if part.strip():
                self.stream.write(part.strip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable, enabled: bool, **kwargs: Any) -> Iterable:
    """``tqdm(iterable)`` when ``enabled`` (rank 0), else the iterable itself.

    In a terminal the bar redraws in place; when output is piped (``concord run`` prefixes
    each line) it prints a fresh line every few seconds instead.
    """
    if not enabled:
        return iterable
    stream = sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, dynamic_ncols=True, **kwargs)
    return tqdm(iterable, file=_LineStream(stream), mininterval=5.0, ncols=80, **kwargs)
