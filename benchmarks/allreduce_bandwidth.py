"""Allreduce bus bandwidth: concord's shared-memory ring vs torch.distributed (gloo).

    flock /tmp/concord-bench.lock .venv/bin/python benchmarks/allreduce_bandwidth.py [--quick]

For N = 2 and 4 worker processes on this host and float32 tensors of 1, 16 and 64 MB, each
engine sums the tensor across workers in place. Time per repeat is the slowest worker's
(all workers start together after a barrier); the table shows medians over the repeats.
Bus bandwidth = bytes * 2(N-1)/N / time, the data each worker must send in a bandwidth-
optimal allreduce. Both leave the sum in the user's tensor: the ring's time includes
copying the result out of its shared-memory wire; gloo reduces in place.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _plot import grouped_bars  # noqa: E402
from multiproc import run_workers  # noqa: E402

MB = 2**20


def timed(fn: Callable[[], None], repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per call, the slowest worker's, for ``repeats`` calls after ``warmup``."""
    import torch
    import torch.distributed as dist

    times = []
    for i in range(warmup + repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(float(took))
    return times


def _bench(sizes_mb: list[int], repeats: int, chunk_kb: int) -> dict:
    import torch
    import torch.distributed as dist

    import concord
    from concord.algorithms.ring import ring_allreduce
    from concord.comm.shm import ShmRing

    ctx = concord.init(timeout=120)
    ring = ShmRing(
        ctx.rank,
        ctx.world_size,
        ctx.store,
        "bench/ring/",
        max(sizes_mb) * MB,
        ctx.timeout,
        ctx.secret,
    )
    out = {}
    for size in sizes_mb:
        numel = size * MB // 4
        x = torch.full((numel,), float(ctx.rank + 1))
        region = ring.region(0, numel, torch.float32)

        def ring_op(x: torch.Tensor = x, region=region) -> None:  # noqa: ANN001
            x.copy_(ring_allreduce(region, x, chunk_kb * 1024 // 4))

        def gloo_op(x: torch.Tensor = x) -> None:
            dist.all_reduce(x)

        gloo = timed(gloo_op, repeats)
        mine = timed(ring_op, repeats)
        gloo += timed(gloo_op, repeats)  # interleaved: the same noise for both
        mine += timed(ring_op, repeats)
        out[size] = {"gloo": statistics.median(gloo), "ring": statistics.median(mine)}
    ring.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (5 in all)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--chunk-kb", type=int, default=1024)
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 5  # per half: the median is over 2 * repeats
    rows = []
    for world in args.worlds:
        res = run_workers(_bench, world, (args.sizes_mb, repeats, args.chunk_kb), timeout=600)[0]
        for size in args.sizes_mb:
            factor = size * MB * 2 * (world - 1) / world / 1e9
            gloo, ring = res[size]["gloo"], res[size]["ring"]
            rows.append(
                {
                    "world": world,
                    "mb": size,
                    "gloo_gbps": factor / gloo,
                    "ring_gbps": factor / ring,
                    "speedup": gloo / ring,
                }
            )
    print(f"{'N':>3} {'MB':>4} {'gloo GB/s':>10} {'ring GB/s':>10} {'ring/gloo':>10}")
    for r in rows:
        print(
            f"{r['world']:>3} {r['mb']:>4} {r['gloo_gbps']:>10.2f} {r['ring_gbps']:>10.2f} "
            f"{r['speedup']:>9.2f}x"
        )
    print(json.dumps({"benchmark": "allreduce_bandwidth", "repeats": 2 * repeats, "rows": rows}))
    grouped_bars(
        "allreduce_bandwidth",
        "allreduce bus bandwidth: concord ring vs gloo",
        [f"N={r['world']}\n{r['mb']} MB" for r in rows],
        {"gloo": [r["gloo_gbps"] for r in rows], "ring": [r["ring_gbps"] for r in rows]},
        "GB/s",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
