"""Data sharing: samples/s delivered per worker, and network bytes per epoch, by source.

    flock /tmp/concord-bench.lock .venv/bin/python benchmarks/data_sharing.py [--quick]

For each world size N it starts one job of N real worker processes (and one data-server
process) on 127.0.0.1 that measures the sources (local, dfs on file://, central, p2p) one
after another: each worker iterates every batch of its share for a few epochs without
training. Reported per worker: samples/s (median over the measured epochs, including
``set_epoch``, i.e. the p2p exchange) and bytes moved over the network per epoch (dfs: shard
bytes read from the file system, which on NFS or S3 is network traffic; central: bytes sent
plus received on the wire; p2p: bytes sent to peers; local: none). Epoch 0 is warm-up.
All sources read the same data: MNIST train (60k samples, or 15k with --quick).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from concord.comm.rendezvous import free_port, new_secret  # noqa: E402
from concord.data.dfs import write_shards  # noqa: E402
from concord.data.mnist import mnist  # noqa: E402

MODES = ("local", "dfs", "central", "p2p")


def _make(mode: str, data: TensorDataset | None, url: str, rank: int, world: int, batch: int):
    from concord.data.central import CentralLoader
    from concord.data.dfs import DFSLoader, ShardedFiles
    from concord.data.loader import loader
    from concord.data.p2p import P2PLoader

    if mode == "local":
        return loader(data, batch, rank=rank, world=world, seed=0)
    if mode == "dfs":
        return DFSLoader(ShardedFiles(url, rank, world, seed=0), batch)
    if mode == "central":
        return CentralLoader.from_job(rank=rank, world=world, batch_size=batch, seed=0)
    return P2PLoader.from_dataset(data, rank=rank, world=world, batch_size=batch, seed=0)


def _net_bytes(mode: str, loader) -> int:  # noqa: ANN001
    if mode == "dfs":
        return loader.bytes_read
    if mode == "central":
        return loader.client.bytes_received + loader.client.bytes_sent
    if mode == "p2p":
        return loader.bytes_sent
    return 0


def _measure(mode: str, loader, epochs: int) -> tuple[float, float]:  # noqa: ANN001
    rates, nets = [], []
    for epoch in range(epochs + 1):
        before = _net_bytes(mode, loader)
        start = time.perf_counter()
        (loader if hasattr(loader, "set_epoch") else loader.sampler).set_epoch(epoch)
        samples = sum(len(y) for _, y in loader)
        seconds = time.perf_counter() - start
        if epoch > 0:
            rates.append(samples / seconds)
            nets.append(_net_bytes(mode, loader) - before)
    return statistics.median(rates), statistics.mean(nets)


def _worker(modes: list[str], url: str, n: int, batch: int, epochs: int, env: dict, results):
    os.environ.update(env)
    torch.set_num_threads(1)
    import torch.distributed as dist

    import concord

    try:
        ctx = concord.init(timeout=120)
        full = mnist("train")
        data = TensorDataset(*(t[:n].clone() for t in full.tensors))
        del full
        out = {}
        for mode in modes:  # one mode at a time on every worker
            dist.barrier()
            loader = _make(mode, data, url, ctx.rank, ctx.world_size, batch)
            out[mode] = _measure(mode, loader, epochs)
        results.put((ctx.rank, "ok", out))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        results.put((int(env["RANK"]), "error", repr(exc)))
    finally:
        concord.shutdown()


def _start_server(url: str, base: dict) -> subprocess.Popen:
    env = os.environ | base | {"CONCORD_ROLE": "data", "RANK": "0", "LOCAL_RANK": "0"}
    argv = [sys.executable, "-m", "concord.data.server", f"dfs:{url}"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_world(world: int, modes: list[str], url: str, n: int, batch: int, epochs: int) -> list:
    """One job of ``world`` workers (plus a data server) measuring every mode in turn."""
    ctx = mp.get_context("spawn")
    base = {
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "CONCORD_SECRET": new_secret(),
        "CONCORD_TIMEOUT": "120",
        "OMP_NUM_THREADS": "1",
    }
    server = _start_server(url, base) if "central" in modes else None
    results = ctx.Queue()
    procs = []
    for rank in range(world):
        env = base | {"RANK": str(rank), "LOCAL_RANK": str(rank), "CONCORD_ROLE": "worker"}
        args = (modes, url, n, batch, epochs, env, results)
        procs.append(ctx.Process(target=_worker, args=args))
        procs[-1].start()
    out = {}
    try:
        while len(out) < world:
            rank, status, value = results.get(timeout=300)
            if status != "ok":
                raise RuntimeError(f"N={world}: rank {rank} failed: {value}")
            out[rank] = value
    except queue.Empty:
        raise RuntimeError(f"N={world}: workers did not finish in 300 s") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        if server is not None:
            server.terminate()
            server.communicate(timeout=30)
    rows = []
    for mode in modes:
        rates = [out[r][mode][0] for r in range(world)]
        nets = [out[r][mode][1] for r in range(world)]
        rows.append(
            {
                "mode": mode,
                "world": world,
                "samples_per_s_per_worker": statistics.mean(rates),
                "net_bytes_per_epoch_per_worker": statistics.mean(nets),
                "net_bytes_per_epoch_total": sum(nets),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="15k samples, 3 measured epochs")
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shards", type=int, default=16)
    args = parser.parse_args()
    n = 15_000 if args.quick else 60_000
    epochs = 3 if args.quick else 5
    full = mnist("train")
    with tempfile.TemporaryDirectory(prefix="concord-bench-data-") as tmp:
        url = f"file://{tmp}/mnist"
        start = time.perf_counter()
        write_shards([t[:n] for t in full.tensors], url, args.shards, name="mnist")
        shard_s = time.perf_counter() - start
        del full
        rows = []
        for world in (int(w) for w in args.worlds.split(",")):
            rows += run_world(world, args.modes.split(","), url, n, args.batch_size, epochs)
    print(f"\n{n} samples, batch {args.batch_size}, {args.shards} shards ({shard_s:.1f}s to write)")
    print(f"{'mode':8s} {'N':>2s} {'samples/s/worker':>17s} {'net MB/epoch/worker':>20s}")
    for r in rows:
        print(
            f"{r['mode']:8s} {r['world']:>2d} {r['samples_per_s_per_worker']:>17,.0f} "
            f"{r['net_bytes_per_epoch_per_worker'] / 1e6:>20.2f}"
        )
    print(json.dumps({"benchmark": "data_sharing", "samples": n, "results": rows}))
    from _plot import grouped_bars  # (this folder: the script's own)

    worlds = sorted({r["world"] for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    rate = {(r["mode"], r["world"]): r["samples_per_s_per_worker"] for r in rows}
    grouped_bars(
        "data_sharing",
        "data sources: samples/s per worker",
        modes,
        {f"N={w}": [rate.get((m, w)) for m in modes] for w in worlds},
        "samples/s per worker",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
