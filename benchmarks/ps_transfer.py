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
  (PyTorch's own parameter-server recipe).

Each peer runs in fresh processes on 127.0.0.1 in the same run; medians of ``--reps``.

    flock /tmp/concord-bench.lock python benchmarks/ps_transfer.py [--quick] [--sizes 1,16,64]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

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


def _rpc_proc(rank: int, port: int, nbytes: int, reps: int, out) -> None:  # noqa: ANN001
    import torch.distributed.rpc as rpc

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    opts = rpc.TensorPipeRpcBackendOptions(rpc_timeout=120, init_method=f"tcp://127.0.0.1:{port}")
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


def time_rpc(nbytes: int, reps: int) -> list[float]:
    from concord.comm.rendezvous import free_port

    port, unused = free_port(), _CTX.Queue()  # keep the queue alive while the child starts
    peer = _CTX.Process(target=_rpc_proc, args=(1, port, nbytes, reps, unused))
    peer.start()
    try:
        return _run(_rpc_proc, (0, port, nbytes, reps))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,16,64", help="payload sizes in MB")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="5 reps, sizes 1 and 16 MB")
    parser.add_argument("--no-rpc", action="store_true", help="skip torch.distributed.rpc")
    parser.add_argument(
        "--compression",
        choices=("fp16", "bf16"),
        help="also time concord pushing in half precision (lanes and TCP only)",
    )
    args = parser.parse_args(argv)
    sizes = [1, 16] if args.quick else [int(s) for s in args.sizes.split(",")]
    reps = 5 if args.quick else args.reps
    rows = []
    print(
        f"{'MB':>4} {'concord ms':>11} {'blocking':>9} {'tcp ms':>8} {'zmq ms':>8} "
        f"{'zmq poll':>9} {'rpc ms':>8} {'vs zmq':>7} {'vs poll':>7} {'tcp/zmq':>7} {'vs rpc':>7}"
    )
    for mb in sizes:
        nbytes = mb * MB
        row = {"mb": mb, "concord_ms": 1e3 * statistics.median(time_concord(nbytes, reps))}
        times = time_concord(nbytes, reps, spin=False)
        row["concord_blocking_ms"] = 1e3 * statistics.median(times)
        row["concord_tcp_ms"] = 1e3 * statistics.median(time_concord(nbytes, reps, lanes=False))
        if args.compression:
            for key, lanes in (("concord_half_ms", True), ("concord_tcp_half_ms", False)):
                times = time_concord(nbytes, reps, lanes, args.compression)
                row[key] = 1e3 * statistics.median(times)
        row["zmq_ms"] = 1e3 * statistics.median(time_zmq(nbytes, reps))
        row["zmq_polling_ms"] = 1e3 * statistics.median(time_zmq(nbytes, reps, polling=True))
        row["rpc_ms"] = None if args.no_rpc else 1e3 * statistics.median(time_rpc(nbytes, reps))
        row["goodput_vs_zmq"] = row["zmq_ms"] / row["concord_ms"]
        row["goodput_vs_zmq_polling"] = row["zmq_polling_ms"] / row["concord_ms"]
        row["tcp_goodput_vs_zmq"] = row["zmq_ms"] / row["concord_tcp_ms"]
        row["time_vs_rpc"] = row["concord_ms"] / row["rpc_ms"] if row["rpc_ms"] else None
        rows.append(row)
        rpc = f"{row['rpc_ms']:8.1f}" if row["rpc_ms"] else f"{'-':>8}"
        ratio = f"{row['time_vs_rpc']:7.2f}" if row["time_vs_rpc"] else f"{'-':>7}"
        print(
            f"{mb:>4} {row['concord_ms']:11.2f} {row['concord_blocking_ms']:9.2f} "
            f"{row['concord_tcp_ms']:8.2f} {row['zmq_ms']:8.2f} {row['zmq_polling_ms']:9.2f} "
            f"{rpc} {row['goodput_vs_zmq']:7.2f} {row['goodput_vs_zmq_polling']:7.2f} "
            f"{row['tcp_goodput_vs_zmq']:7.2f} {ratio}",
            flush=True,
        )
        if args.compression:
            print(
                f"     {args.compression} pushes: concord {row['concord_half_ms']:.1f} ms, "
                f"TCP only {row['concord_tcp_half_ms']:.1f} ms",
                flush=True,
            )
    print(json.dumps({"benchmark": "ps_transfer", "reps": reps, "results": rows}))
    from _plot import grouped_bars  # (this folder: the script's own)

    grouped_bars(
        "ps_transfer",
        "one push + pull (lower is better)",
        [f"{r['mb']} MB" for r in rows],
        {
            "concord": [r["concord_ms"] for r in rows],
            "concord, blocking": [r["concord_blocking_ms"] for r in rows],
            "concord, TCP only": [r["concord_tcp_ms"] for r in rows],
            "raw zmq echo": [r["zmq_ms"] for r in rows],
            "raw zmq echo, polling": [r["zmq_polling_ms"] for r in rows],
            "torch rpc": [r["rpc_ms"] for r in rows],
        },
        "ms",
        log=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
