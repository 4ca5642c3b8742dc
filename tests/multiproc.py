"""Run a function in N real processes on 127.0.0.1 with the concord env contract.

Used by the multi-process tests: free ports, a timeout on every wait, every child reaped,
and a failure names the rank that failed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import traceback
from collections.abc import Callable
from typing import Any

from concord.comm.rendezvous import free_port, new_secret

_CTX = mp.get_context("spawn")


def _child(fn, rank, env, args, results) -> None:  # noqa: ANN001 - runs in the child
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    try:
        # plain pickle copies tensors into bytes (torch's queue would share fds that die
        # with the child); this is local test IPC, never network traffic
        results.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import concord

            concord.shutdown()
        except Exception:  # noqa: BLE001
            pass


def job_env(world: int, port: int | None = None, servers: int = 0) -> dict[str, str]:
    """The env contract shared by every process of a localhost test job."""
    return {
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port or free_port()),
        "CONCORD_SERVERS": str(servers),
        "CONCORD_SECRET": new_secret(),
    }


def run_workers(
    fn: Callable[..., Any],
    world: int,
    args: tuple = (),
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    ranks: list[int] | None = None,
    rank_args: Callable[[int], tuple] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` as workers 0..world-1 (or only ``ranks``); return results by rank.

    ``rank_args(rank)``, when given, supplies per-rank arguments instead of ``args``.
    Raises AssertionError naming the rank whose function raised, or the ranks that did not
    finish within ``timeout`` seconds. Every child is killed and joined before returning.
    """
    base = job_env(world) | (env or {})
    ranks = list(range(world)) if ranks is None else ranks
    results = _CTX.Queue()
    procs = {}
    for rank in ranks:
        child_env = base | {"RANK": str(rank), "LOCAL_RANK": str(rank), "CONCORD_ROLE": "worker"}
        child_args = rank_args(rank) if rank_args else args
        proc = _CTX.Process(target=_child, args=(fn, rank, child_env, child_args, results))
        proc.start()
        procs[rank] = proc
    out: dict[int, Any] = {}
    try:
        while len(out) < len(ranks):
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(ranks) - set(out))
                raise AssertionError(f"ranks {missing} did not finish within {timeout}s") from None
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for proc in procs.values():
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    return [out[r] for r in ranks]
