"""Keep freed message buffers for reuse: glibc malloc tuning for processes that move tensors.

Every received message and every decoded tensor is a fresh allocation of up to a few MB. By
default glibc serves such sizes with ``mmap`` or hands freed heap back to the kernel, so each
message page-faults all of its buffer again (measured here, in a VM: a 4 MB buffer costs more
to fault in than to fill). :func:`keep_freed_memory` makes allocations below
``mmap_threshold`` come from the heap and keeps up to ``trim_threshold`` of freed heap, as
jemalloc or tcmalloc would. It is applied by parameter-server processes (workers and servers)
and the data server; set ``CONCORD_MALLOC_TUNING=0`` to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("concord.alloc")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_applied = False


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Apply the tuning once per process (glibc only); True if it is in effect."""
    global _applied
    if _applied:
        return True
    if os.environ.get("CONCORD_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok = mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
    _applied = ok
    log.debug("malloc tuning %s", "applied" if ok else "refused")
    return ok
