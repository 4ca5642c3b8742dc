"""One parameter-server push+pull of 1/16/64 MB: concord vs raw pyzmq vs torch.distributed.rpc.

- concord: ``PSOptimizer.step()`` with one worker and one server (sync mode, SGD): the
  gradient goes up, the server averages and steps, the new parameters come back; every
  byte is authenticated (GMAC under a per-message key derived with HMAC-SHA256). On one
  host the bulk bytes go through shared-memory lanes; ``concord tcp`` is the same run with
  ``CONCORD_LANES=0`` (everything through the TCP socket, as between hosts). With
  ``--compression fp16|bf16`` both run again pushing the gradient in half precision.
  Each process spins before it sleeps (``CONCORD_SPIN_US``, :mod:`concord.comm.spin`) as
  ``concord run -n 1 --servers 1`` would set it on this host (two processes: they spin on a
  host with two cores or more); ``blocking`` is the lanes run with ``CONCORD_SPIN_US=0``.
- raw zmq: a DEALER sends the same bytes as one frame, a ROUTER echoes them back (no auth),
  each waiting in a blocking ``recv`` (the issue's peer); ``zmq polling``: the same echo with
  both ends polling (``NOBLOCK`` receives and ``sched_yield``), as concord's spin does.
- rpc: ``rpc_sync`` carries the tensor to a TensorPipe peer that returns one of equal size
  (PyTorch's own parameter-server recipe); ``rpc tcp`` is the same with TensorPipe held to
  its TCP transport and basic channel (``_transports=["uv"], _channels=["basic"]``), as
  between hosts: the peer of ``concord tcp``.

Each peer runs ``--runs`` times, each time in fresh processes on 127.0.0.1, in rounds that
time every peer once in turn (so a drift of the host's speed falls on all of them alike); a
time is the median of all ``runs x reps`` round trips, ``spread`` gives the least and
greatest of the runs' own medians, and ``each round's ratio`` the range of a ratio between
two peers timed in the same round (rpc's round trips here fall into a few distinct levels, at
16 MB about 7, 55 and 100 ms, and how many land in each differs from one run to the next).

    flock /tmp/concord-bench.lock python benchmarks/ps_transfer.py [--quick] [--sizes 1,16,64]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

_CTX = mp.get_context("spawn")
MB = 1 << 20


def _job_env(world: int, servers: int) -> dict[str, str]:
    from concord.comm.rendezvous import free_port, new_secret
    from concord.comm.spin import default_spin_us, usable_cores

    return {
        "CONCORD_SPIN_US": str(default_spin_us(world + servers, usable_cores())),
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "CONCORD_SERVERS": str(servers),
        "CONCORD_SECRET": new_secret(),
        "CONCORD_TIMEOUT": "120",
    }


# -- concord --------------------------------------------------------------------------------
def _concord_worker(  # noqa: ANN001 - (out: a multiprocessing queue)
    env: dict[str, str], nbytes: int, reps: int, compression: str | None, out
) -> None:
    os.environ.update(env | {"RANK": "0", "LOCAL_RANK": "0", "CONCORD_ROLE": "worker"})
    torch.set_num_threads(1)
    import concord

    concord.init()
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(nbytes // 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    strategy = concord.ParameterServer(mode="sync", compression=compression)
    model, opt = concord.distribute(model, opt, strategy)
    model.w.grad = torch.ones_like(model.w)
    times = []
    for _ in range(reps + 2):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    opt.close()
    concord.shutdown()
    out.put(times[2:])


def time_concord(
    nbytes: int,
    reps: int,
    lanes: bool = True,
    compression: str | None = None,
    spin: bool = True,
) -> list[float]:
    env = _job_env(1, 1) | {"CONCORD_LANES": "1" if lanes else "0"}
    if not spin:
        env["CONCORD_SPIN_US"] = "0"
    server = subprocess.Popen(
        [sys.executable, "-m", "concord.strategies.ps.server"],
        env=os.environ | env | {"RANK": "0", "CONCORD_ROLE": "server"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return _run(_concord_worker, (env, nbytes, reps, compression))
    finally:
        server.terminate()
        server.wait(timeout=30)


# -- raw zmq --------------------------------------------------------------------------------
def _zmq_recv(sock, polling: bool) -> list:  # noqa: ANN001
    """The next message's frames: a blocking receive, or looks without blocking until one
    comes (yielding the core between looks)."""
    import zmq

    while polling:
        try:
            return sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            os.sched_yield()
    return sock.recv_multipart(copy=False)


def _zmq_echo(port_out, reps: int, polling: bool) -> None:  # noqa: ANN001
    import zmq

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port_out.put(sock.bind_to_random_port("tcp://127.0.0.1"))
    for _ in range(reps + 2):
        sock.send_multipart(_zmq_recv(sock, polling), copy=False)
    sock.close(linger=1000)


def _zmq_client(port: int, nbytes: int, reps: int, polling: bool, out) -> None:  # noqa: ANN001
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    payload = memoryview(torch.ones(nbytes // 4).numpy()).cast("B")
    times = []
    for _ in range(reps + 2):
        start = time.perf_counter()
        sock.send(payload, copy=False)
        _zmq_recv(sock, polling)
        times.append(time.perf_counter() - start)
    sock.close()
    out.put(times[2:])


def time_zmq(nbytes: int, reps: int, polling: bool = False) -> list[float]:
    ports = _CTX.Queue()
    echo = _CTX.Process(target=_zmq_echo, args=(ports, reps, polling))
    echo.start()
    try:
        return _run(_zmq_client, (ports.get(timeout=60), nbytes, reps, polling))
    finally:
        echo.join(timeout=30)
        if echo.is_alive():
            echo.kill()


# -- torch.distributed.rpc ------------------------------------------------------------------
def _rpc_echo(t: torch.Tensor) -> torch.Tensor:
    return t


def _rpc_proc(rank: int, port: int, nbytes: int, reps: int, tcp: bool, out) -> None:  # noqa: ANN001
    import torch.distributed.rpc as rpc

    # rpc's own shutdown hands a ProcessGroupGloo to an object gather, which warns of it
    warnings.filterwarnings("ignore", "You are using a Backend", UserWarning)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    only_tcp = {"_transports": ["uv"], "_channels": ["basic"]} if tcp else {}
    opts = rpc.TensorPipeRpcBackendOptions(
        rpc_timeout=120, init_method=f"tcp://127.0.0.1:{port}", **only_tcp
    )
    rpc.init_rpc(f"p{rank}", rank=rank, world_size=2, rpc_backend_options=opts)
    if rank == 0:
        t = torch.ones(nbytes // 4)
        times = []
        for _ in range(reps + 2):
            start = time.perf_counter()
            rpc.rpc_sync("p1", _rpc_echo, args=(t,))
            times.append(time.perf_counter() - start)
        out.put(times[2:])
    rpc.shutdown()


def time_rpc(nbytes: int, reps: int, tcp: bool = False) -> list[float]:
    from concord.comm.rendezvous import free_port

    port, unused = free_port(), _CTX.Queue()  # keep the queue alive while the child starts
    peer = _CTX.Process(target=_rpc_proc, args=(1, port, nbytes, reps, tcp, unused))
    peer.start()
    try:
        return _run(_rpc_proc, (0, port, nbytes, reps, tcp))
    finally:
        peer.join(timeout=60)
        if peer.is_alive():
            peer.kill()


def _run(target, args: tuple) -> list[float]:  # noqa: ANN001
    out = _CTX.Queue()
    proc = _CTX.Process(target=target, args=(*args, out))
    proc.start()
    try:
        return out.get(timeout=300)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()


def _interleaved(
    timers: dict[str, Callable[[], list[float]]], runs: int
) -> dict[str, list[list[float]]]:
    """Each timer's round trips (ms) for ``runs`` rounds, every round timing every peer once
    in turn (fresh processes each time), so a drift of this host's speed over the minutes
    of a run falls on all peers alike."""
    times: dict[str, list[list[float]]] = {key: [] for key in timers}
    for _ in range(runs):
        for key, timer in timers.items():
            times[key].append([1e3 * t for t in timer()])
    return times


def _pooled(runs: list[list[float]]) -> tuple[float | None, list[float]]:
    """The median of every run's round trips pooled, and each run's own median (ms)."""
    if not runs:
        return None, []
    return statistics.median(t for run in runs for t in run), [statistics.median(r) for r in runs]


# peer columns: (row key, column title, plot label)
_PEERS = [
    ("concord", "concord", "concord"),
    ("concord_blocking", "blocking", "concord, blocking"),
    ("concord_tcp", "tcp", "concord, TCP only"),
    ("zmq", "zmq", "raw zmq echo"),
    ("zmq_polling", "zmq poll", "raw zmq echo, polling"),
    ("rpc", "rpc", "torch rpc"),
    ("rpc_tcp", "rpc tcp", "torch rpc, TCP only"),
]
# ratio columns: (row key, title, numerator peer, denominator peer)
_RATIOS = [
    ("goodput_vs_zmq", "vs zmq", "zmq", "concord"),
    ("goodput_vs_zmq_polling", "vs poll", "zmq_polling", "concord"),
    ("tcp_goodput_vs_zmq", "tcp/zmq", "zmq", "concord_tcp"),
    ("time_vs_rpc", "vs rpc", "concord", "rpc"),
    ("tcp_time_vs_rpc_tcp", "tcp/rpc", "concord_tcp", "rpc_tcp"),
]


def _timers(nbytes: int, reps: int, rpc: bool) -> dict[str, Callable[[], list[float]] | None]:
    return {
        "concord": lambda: time_concord(nbytes, reps),
        "concord_blocking": lambda: time_concord(nbytes, reps, spin=False),
        "concord_tcp": lambda: time_concord(nbytes, reps, lanes=False),
        "zmq": lambda: time_zmq(nbytes, reps),
        "zmq_polling": lambda: time_zmq(nbytes, reps, polling=True),
        "rpc": (lambda: time_rpc(nbytes, reps)) if rpc else None,
        "rpc_tcp": (lambda: time_rpc(nbytes, reps, tcp=True)) if rpc else None,
    }


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,16,64", help="payload sizes in MB")
    parser.add_argument("--reps", type=int, default=15, help="round trips per run")
    parser.add_argument("--runs", type=int, default=3, help="fresh process sets per peer")
    parser.add_argument("--quick", action="store_true", help="5 reps, 1 run, sizes 1 and 16 MB")
    parser.add_argument("--no-rpc", action="store_true", help="skip torch.distributed.rpc")
    parser.add_argument(
        "--compression",
        choices=("fp16", "bf16"),
        help="also time concord pushing in half precision (lanes and TCP only)",
    )
    args = parser.parse_args(argv)
    sizes = [1, 16] if args.quick else [int(s) for s in args.sizes.split(",")]
    reps, runs = (5, 1) if args.quick else (args.reps, args.runs)
    if reps < 1 or runs < 1:
        parser.error("--reps and --runs must be at least 1")
    rows = []
    titles = [f"{title:>9}" for _, title, _ in _PEERS] + [f"{t:>7}" for _, t, _, _ in _RATIOS]
    print(f"{'MB':>4} " + " ".join(titles) + "   (ms; goodput and time ratios)")
    for mb in sizes:
        nbytes = mb * MB
        row: dict[str, Any] = {"mb": mb}
        timers = {k: t for k, t in _timers(nbytes, reps, not args.no_rpc).items() if t}
        if args.compression:
            for key, lanes in (("concord_half", True), ("concord_tcp_half", False)):
                timers[key] = functools.partial(time_concord, nbytes, reps, lanes, args.compression)
        times = _interleaved(timers, runs)
        for key in dict.fromkeys([*(k for k, _, _ in _PEERS), *timers]):  # (absent: None)
            row[f"{key}_ms"], row[f"{key}_run_ms"] = _pooled(times.get(key, []))
        for key, _, top, bottom in _RATIOS:
            a, b = row[f"{top}_ms"], row[f"{bottom}_ms"]
            row[key] = a / b if a is not None and b is not None else None
            pairs = zip(row[f"{top}_run_ms"], row[f"{bottom}_run_ms"], strict=False)
            row[f"{key}_runs"] = [x / y for x, y in pairs]  # the same round's two peers
        rows.append(row)
        cells = [_cell(row[f"{key}_ms"], 9, 2) for key, _, _ in _PEERS]
        ratios = [_cell(row[key], 7, 2) for key, *_ in _RATIOS]
        print(f"{mb:>4} " + " ".join(cells + ratios), flush=True)
        if runs > 1:
            spread = ", ".join(
                f"{key} {min(row[f'{key}_run_ms']):.2f}-{max(row[f'{key}_run_ms']):.2f}"
                for key, _, _ in _PEERS
                if row[f"{key}_run_ms"]
            )
            print(f"     spread of the {runs} runs' medians (ms): {spread}", flush=True)
            paired = ", ".join(
                f"{title.strip()} {min(row[f'{key}_runs']):.2f}-{max(row[f'{key}_runs']):.2f}"
                for key, title, _, _ in _RATIOS
                if row[f"{key}_runs"]
            )
            print(f"     each round's ratio: {paired}", flush=True)
        if args.compression:
            print(
                f"     {args.compression} pushes: concord {row['concord_half_ms']:.1f} ms, "
                f"TCP only {row['concord_tcp_half_ms']:.1f} ms",
                flush=True,
            )
    print(json.dumps({"benchmark": "ps_transfer", "reps": reps, "runs": runs, "results": rows}))
    from _plot import grouped_bars  # (this folder: the script's own)

    grouped_bars(
        "ps_transfer",
        "one push + pull (lower is better)",
        [f"{r['mb']} MB" for r in rows],
        {label: [r[f"{key}_ms"] for r in rows] for key, _, label in _PEERS},
        "ms",
        log=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
