"""How the launchers of one job talk to each other through the job's TCPStore.

Node 0's launcher hosts the store for the whole job (it outlives restarts); the other nodes'
launchers connect to it as clients. Their own keys live under ``concord/launcher/`` and are
kept when the store is cleared for a restart; everything else belongs to one attempt.

Per attempt ``a``: ``a/failed`` holds the first failure reported by any node; ``a/done/R``
says node R's workers all exited 0; ``a/stopped/R`` says node R stopped its processes after a
failure; ``a/go`` (set by node 0 after clearing the store) lets the other nodes restart.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch.distributed as dist

from concord.errors import PeerTimeoutError, UsageError

PREFIX = "concord/launcher/"


def host_store(addr: str, port: int, timeout: float) -> dist.TCPStore:
    """Host the job's TCPStore (node 0). Port 0 binds a free port: read it from ``.port``."""
    try:
        return dist.TCPStore(
            addr,
            port,
            is_master=True,
            timeout=timedelta(seconds=timeout),
            wait_for_workers=False,
            use_libuv=True,
        )
    except (RuntimeError, OSError) as exc:
        if "EADDRINUSE" in str(exc) or "in use" in str(exc):
            raise UsageError(
                f"port {port} is already in use on this machine, so the launcher cannot host "
                "the job's store there; pick another --master-port, or 0 for a free one"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"cannot host the job's store on {addr}:{port} ({first}); check --master-addr "
            "and --master-port"
        ) from None


def join_store(addr: str, port: int, timeout: float) -> dist.TCPStore:
    """Connect to node 0's store as a client, waiting up to ``timeout`` for it to come up."""
    try:
        return dist.TCPStore(
            addr, port, is_master=False, timeout=timedelta(seconds=timeout), use_libuv=True
        )
    except (RuntimeError, OSError) as exc:
        raise PeerTimeoutError(
            f"node 0's launcher did not answer at {addr}:{port} within {timeout:g}s; start "
            "node 0 first (or together) with the same --master-addr/--master-port "
            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r})"
        ) from None


def clear_attempt_keys(store: dist.Store) -> int:
    """Delete every key that is not the launchers' own (a restart must not see stale keys)."""
    removed = 0
    for key in store.list_keys():
        if not key.startswith(PREFIX) and store.delete_key(key):
            removed += 1
    return removed


class Nodes:
    """The cross-node side of one launcher (a no-op when the job has one node)."""

    def __init__(self, store: dist.Store | None, nnodes: int, node_rank: int) -> None:
        self.store = store if nnodes > 1 else None
        self.nnodes = nnodes
        self.node_rank = node_rank

    def _key(self, attempt: int, what: str) -> str:
        return f"{PREFIX}{attempt}/{what}"

    def report_failure(self, attempt: int, message: str) -> None:
        """Tell the other nodes this attempt failed (first report wins)."""
        if self.store is None:
            return
        try:
            if self.store.add(self._key(attempt, "failed-count"), 1) == 1:
                self.store.set(self._key(attempt, "failed"), f"node {self.node_rank}: {message}")
        except (RuntimeError, OSError):
            pass  # node 0 is gone: the other nodes learn it from the lost store

    def failure(self, attempt: int) -> str | None:
        """The failure another node reported for this attempt, or None."""
        if self.store is None:
            return None
        key = self._key(attempt, "failed")
        try:
            if self.store.check([key]):
                return self.store.get(key).decode()
        except (RuntimeError, OSError):
            return "the job's store on node 0 stopped answering (node 0's launcher exited?)"
        return None

    def mark(self, attempt: int, what: str) -> None:
        """Record this node's state (``done`` or ``stopped``) for ``attempt``."""
        if self.store is None:
            return
        try:
            self.store.set(self._key(attempt, f"{what}/{self.node_rank}"), "1")
        except (RuntimeError, OSError):
            pass  # node 0 is gone; its launcher reported the job's end already

    def missing(self, attempt: int, what: str) -> list[int]:
        """Nodes that have not marked ``what`` for ``attempt``."""
        if self.store is None:
            return []
        return [
            r
            for r in range(self.nnodes)
            if not self.store.check([self._key(attempt, f"{what}/{r}")])
        ]

    def wait_stopped(self, attempt: int, timeout: float) -> None:
        """Node 0: wait until every node stopped its processes after a failure."""
        if self.store is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            done = set(r for r in range(self.nnodes) if r not in self.missing(attempt, "done"))
            if done:
                raise PeerTimeoutError(
                    f"cannot restart: node(s) {sorted(done)} already finished attempt {attempt}"
                )
            waiting = self.missing(attempt, "stopped")
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise PeerTimeoutError(
                    f"cannot restart: node(s) {waiting} did not stop their processes within "
                    f"{timeout:g}s after attempt {attempt} failed; is their launcher running?"
                )
            time.sleep(0.2)

    def allow_restart(self, attempt: int) -> None:
        """Node 0: the store is clean, the other nodes may start ``attempt``."""
        if self.store is not None:
            self.store.set(self._key(attempt, "go"), "1")

    def wait_restart(self, attempt: int, timeout: float) -> None:
        """Nodes > 0: wait for node 0 to allow ``attempt``."""
        if self.store is None:
            return
        try:
            self.store.wait([self._key(attempt, "go")], timedelta(seconds=timeout))
        except (RuntimeError, OSError):
            raise PeerTimeoutError(
                f"node 0 did not start attempt {attempt} within {timeout:g}s; is its launcher "
                "still running?"
            ) from None
