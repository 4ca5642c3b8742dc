"""Workers as batch jobs: the scheduling policy of a PS job's workers on a crowded host.

A parameter server answers every worker of a sync round at once: one reply, written once
into its shared lane, then one wake-up datagram per worker. With more processes than cores,
the kernel lets each woken worker preempt the server at once (a sleeper is owed CPU time),
so the server gets its core back only between workers and the last worker's reply comes
late; meanwhile the early workers compute and the round's barrier waits on the late one.
Measured with timestamps on every process (sync PS N=4 S=2 on 2 cores): the four workers
got their replies spread over ~3 ms, and ~10% of the host's CPU time was idle in each step,
against 2-8% for AllReduce.

Linux's ``SCHED_BATCH`` policy (which any process may take; it needs no privilege) marks a
thread as a throughput job that does not preempt on wake-up: it still gets its fair share
of the cores, but a server that wakes it finishes its replies first. ``concord run`` sets
``CONCORD_WORKER_SCHED=batch`` for the workers of a node that runs parameter servers and
has more processes than usable cores (:func:`default_worker_sched`), unless the
environment already sets it; :func:`~concord.comm.runtime.init` applies it to every thread
of a worker (:func:`apply_worker_sched`). Servers keep the normal policy. ``inherit`` (or
unset) leaves the policy a worker started with. Measured on the same host
(``benchmarks/strategies.py --sched-ab``, four runs): the idle share went from 9-13% to
6-9%, and sync PS N=4 S=2 / AllReduce from medians of 0.85 / 0.91 / 0.90 / 0.88 to 0.89 /
0.96 / 0.95 / 0.93; on a slower day (two more runs) 0.97 / 0.96 to 0.90 / 1.06, within
the noise (faster in 24 of 36 rounds over the six runs). Async PS, with no barrier and ~2%
idle either way, measured the same (0.93 / 0.93). AllReduce workers, whose ring has no
server to wait on, measured no faster with it, so they are left alone.
"""

from __future__ import annotations

import logging
import os

from concord.errors import UsageError

log = logging.getLogger("concord.sched")

SCHED_ENV = "CONCORD_WORKER_SCHED"
POLICIES = ("batch", "inherit")


def default_worker_sched(processes: int, cores: int | None, servers: int) -> str:
    """The policy for the workers of a node that starts ``processes`` processes, ``servers``
    of them parameter servers, on ``cores`` usable cores: ``batch`` when there are servers
    and more processes than cores, else ``inherit`` (also when the cores are unknown)."""
    if processes < 1 or servers < 0:
        raise ValueError(f"need processes >= 1 and servers >= 0, got {processes}, {servers}")
    crowded = cores is not None and processes > cores
    return "batch" if servers and crowded else "inherit"


def worker_sched() -> str:
    """This process's worker policy, from ``CONCORD_WORKER_SCHED`` (unset: ``inherit``)."""
    raw = os.environ.get(SCHED_ENV, "").strip() or "inherit"
    if raw not in POLICIES:
        raise UsageError(
            f"{SCHED_ENV} must be one of {', '.join(POLICIES)}, got {raw!r} (batch: workers "
            "do not preempt the servers on wake-up; concord run sets it from the host's cores)"
        )
    return raw


def apply_worker_sched(policy: str) -> bool:
    """Give every thread of this process ``policy`` (see :data:`POLICIES`); True if it was
    applied, False for ``inherit`` or where the platform has no ``SCHED_BATCH`` or refuses
    (logged: the job runs as before, only slower on a crowded host)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    batch = getattr(os, "SCHED_BATCH", None)
    if policy == "inherit" or batch is None:
        return False
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # (no /proc: this thread only; those started later inherit it)
        threads = [0]
    for tid in threads:
        try:
            os.sched_setscheduler(tid, batch, os.sched_param(0))
        except ProcessLookupError:  # (a thread that ended meanwhile)
            continue
        except OSError as exc:
            log.warning(
                "%s=batch not applied to every thread (%s); the rest keep their policy",
                SCHED_ENV,
                exc,
            )
            return False
    return True
