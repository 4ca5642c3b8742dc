"""Spin before sleeping: how long a channel polls without blocking before it waits in the kernel.

A process that blocks in ``poll`` between two messages wakes up slowly and runs the next
message's Python on cold caches: on the development VM a message's encode took 11 µs in a
tight loop and 37-75 µs right after a sleep of 0.1-2 ms, and a 1 MB push+pull between a
worker and its server went from 1.2 ms to 0.7 ms when neither slept. So, like MPI
implementations and NCCL, a channel first polls without blocking for up to
``CONCORD_SPIN_US`` microseconds (yielding the core after each look, so a runnable thread of
this host, e.g. a ZeroMQ I/O thread, is not held up), then blocks for the rest of its timeout.

Spinning only pays where every process of the job has a core of its own: on a host with
more processes than cores a spinning process takes time from one that has work (measured:
sync PS N=4 S=2 on 2 cores, 1-15% fewer samples/s). ``concord run`` therefore sets
``CONCORD_SPIN_US`` for the processes it starts from :func:`default_spin_us` (the node's
processes against its cores) unless the environment already sets it; a process started by
other means (torchrun, srun, by hand) blocks at once unless ``CONCORD_SPIN_US`` says otherwise.
"""

from __future__ import annotations

import os

from concord.errors import UsageError

SPIN_ENV = "CONCORD_SPIN_US"
#: the spin of a process that has a core to itself: longer than a same-host round trip of a
#: few MB (so the reply comes while spinning), short enough to cost little when it does not
SPIN_US = 1000


def default_spin_us(processes: int, cores: int | None) -> int:
    """The spin (µs) for each of ``processes`` processes on a host with ``cores`` usable
    cores: :data:`SPIN_US` when each has a core of its own, else 0 (and 0 if unknown)."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    return SPIN_US if cores is not None and processes <= cores else 0


def usable_cores() -> int | None:
    """The cores this process may run on (its affinity), None where that is unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def spin_seconds() -> float:
    """This process's spin in seconds, from ``CONCORD_SPIN_US`` (unset: 0)."""
    raw = os.environ.get(SPIN_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(
            f"{SPIN_ENV} must be a whole number of microseconds >= 0, got {raw!r} "
            f"(0: block at once; concord run sets it from the host's cores)"
        )
    return value / 1e6
