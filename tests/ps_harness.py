"""Run a parameter-server job on 127.0.0.1: S server processes plus N spawned workers.

Servers run ``python -m concord.strategies.ps.server`` with the env contract, exactly as the
launcher starts them; workers run a test function through ``multiproc.run_workers``. The
rank-0 worker hosts the store, the servers connect to it as clients. Every process is reaped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from multiproc import _CTX, _child, job_env, run_workers


@dataclass
class PSJob:
    """What a job left behind: worker results by rank, server exit codes and logs."""

    results: list[Any]
    server_codes: list[int | None]
    server_logs: list[str]


def start_servers(env: dict[str, str], servers: int, log_dir: str) -> list[subprocess.Popen]:
    procs = []
    for rank in range(servers):
        server_env = os.environ | env | {"RANK": str(rank), "CONCORD_ROLE": "server"}
        out = open(os.path.join(log_dir, f"server{rank}.log"), "wb")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "concord.strategies.ps.server"],
                env=server_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
        out.close()
    return procs


def stop_servers(procs: list[subprocess.Popen], grace: float) -> list[int | None]:
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=grace))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            codes.append(None)  # still serving: stopped by the harness, like the launcher
    return codes


def run_ps_job(
    fn: Callable[..., Any],
    workers: int,
    servers: int,
    args: tuple = (),
    rank_args: Callable[[int], tuple] | None = None,
    timeout: float = 90.0,
    server_timeout: float = 30.0,
    ranks: list[int] | None = None,
    victims: dict[int, tuple] | None = None,
    grace: float = 15.0,
    on_servers: Callable[[list[subprocess.Popen]], None] | None = None,
) -> PSJob:
    """Run ``fn`` on workers (``ranks``, default all) next to ``servers`` servers.

    ``victims`` maps extra worker ranks to their args: they run ``fn`` in processes whose
    result is ignored (they are expected to die). ``server_timeout`` becomes
    CONCORD_TIMEOUT of the servers. ``on_servers(procs)`` sees the server processes once
    they are started (e.g. to kill one mid-run).
    """
    env = job_env(workers, servers=servers) | {"CONCORD_TIMEOUT": str(server_timeout)}
    with tempfile.TemporaryDirectory() as log_dir:
        procs = start_servers(env, servers, log_dir)
        if on_servers is not None:
            on_servers(procs)
        extra, victim_results = [], _CTX.Queue()  # the queue must outlive the children
        for rank, vargs in (victims or {}).items():
            child_env = env | {"RANK": str(rank), "LOCAL_RANK": str(rank), "CONCORD_ROLE": "worker"}
            proc = _CTX.Process(target=_child, args=(fn, rank, child_env, vargs, victim_results))
            proc.start()
            extra.append(proc)
        codes: list[int | None] = []
        try:
            results = run_workers(
                fn, workers, args=args, timeout=timeout, env=env, ranks=ranks, rank_args=rank_args
            )
        finally:
            codes = stop_servers(procs, grace)
            for proc in extra:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=5)
            logs = [
                open(os.path.join(log_dir, f"server{r}.log"), errors="replace").read()  # noqa: SIM115
                for r in range(servers)
            ]
            if sys.exc_info()[0] is not None:
                for rank, text in enumerate(logs):
                    print(f"--- server {rank} log ---\n{text[-4000:]}")
    return PSJob(results, codes, logs)
