"""Training throughput: concord AllReduce (default engine) vs PyTorch DDP (gloo), MNIST.

    flock /tmp/concord-bench.lock .venv/bin/python benchmarks/dp_vs_ddp.py [--quick]

For N = 2 and 4 worker processes (one thread each) on this host, the MLP (784-512-256-128-10)
and the CNN of ``concord.models``, and batch 64 and 256 per worker: each system trains for a
fixed number of steps (SGD with momentum, cross-entropy, MNIST train preloaded in memory,
each worker its own shard), after warm-up steps. A repeat's time is the slowest worker's;
samples/s = N * batch * steps / time, median over the repeats. The systems alternate
repeat by repeat inside the same processes, so machine noise hits them alike. A third,
"no-comm" (each worker steps alone, no communication at all), gives the ceiling: no
allreduce can make training faster than that, so no-comm/DDP bounds concord/DDP.

``--accuracy`` instead trains the MLP on MNIST with 2 workers (3 epochs, 1 with --quick)
once per compression setting (None, fp16, bf16, PowerSGD rank 4) and prints the test
accuracy of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _plot import grouped_bars  # noqa: E402
from multiproc import run_workers  # noqa: E402

# steps per repeat, by (model, batch): about the same wall time for each config
STEPS = {("mlp", 64): 40, ("mlp", 256): 20, ("cnn", 64): 12, ("cnn", 256): 5}


def _system(name: str, model_name: str, seed: int = 0):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    import concord
    from concord.models import build_model

    torch.manual_seed(seed)
    model = build_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if name == "ddp":
        return DistributedDataParallel(model), opt
    if name == "local":  # no communication at all: the ceiling for any allreduce
        return model, opt
    return concord.distribute(model, opt, concord.AllReduce())


def _run(model, opt, x, y, batch: int, steps: int, start: int) -> int:
    import torch.nn.functional as F

    n = x.shape[0]
    for step in range(start, start + steps):
        i = (step * batch) % (n - batch)
        opt.zero_grad()
        F.cross_entropy(model(x[i : i + batch]), y[i : i + batch]).backward()
        opt.step()
    return start + steps


def _bench(configs: list[tuple[str, int]], repeats: int, scale: float) -> dict:
    import concord
    from concord.data.mnist import mnist

    ctx = concord.init(timeout=300)
    data = mnist("train")
    x, y = data.tensors[0][ctx.rank :: ctx.world_size], data.tensors[1][ctx.rank :: ctx.world_size]
    out = {}
    for model_name, batch in configs:
        steps = max(2, int(STEPS[model_name, batch] * scale))
        systems = {name: _system(name, model_name) for name in ("ddp", "concord", "local")}
        out[f"{model_name}/{batch}"] = samples_per_s(systems, x, y, batch, steps, repeats)
        systems["concord"][0].close()
    return out


def samples_per_s(systems: dict, x, y, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Each ``name: (model, opt)`` of ``systems`` trains ``steps`` steps per repeat, the
    systems taking turns (after 3 warm-up steps each); samples/s over all workers from the
    slowest worker's median time."""
    import torch
    import torch.distributed as dist

    times: dict[str, list[float]] = {name: [] for name in systems}
    cursor = {name: _run(*systems[name], x, y, batch, 3, 0) for name in systems}  # warm-up
    for _ in range(repeats):
        for name, (model, opt) in systems.items():
            dist.barrier()
            begin = time.perf_counter()
            cursor[name] = _run(model, opt, x, y, batch, steps, cursor[name])
            took = torch.tensor([time.perf_counter() - begin], dtype=torch.float64)
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            times[name].append(float(took))
    samples = dist.get_world_size() * batch * steps
    return {name: samples / statistics.median(t) for name, t in times.items()}


def _accuracy(epochs: int, batch: int) -> dict:
    """Test accuracy of the MLP after ``epochs`` with each compression (same seed and data)."""
    import torch

    import concord
    from concord.data.mnist import mnist
    from concord.models import build_model

    ctx = concord.init(timeout=300)
    train, test = mnist("train"), mnist("test")
    x, y = (
        train.tensors[0][ctx.rank :: ctx.world_size],
        train.tensors[1][ctx.rank :: ctx.world_size],
    )
    out = {}
    for compression in (None, "fp16", "bf16", concord.PowerSGD(rank=4)):
        torch.manual_seed(0)
        model = build_model("mlp")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model, opt = concord.distribute(model, opt, concord.AllReduce(compression=compression))
        for epoch in range(epochs):
            _run(model, opt, x, y, batch, x.shape[0] // batch, epoch * (x.shape[0] // batch))
        with torch.no_grad():
            pred = model(test.tensors[0]).argmax(1)
        low_rank = isinstance(compression, concord.PowerSGD)
        name = f"powersgd-{compression.rank}" if low_rank else str(compression)
        out[name] = (pred == test.tensors[1]).float().mean().item()
        model.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="half the steps (1 epoch)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--accuracy", action="store_true", help="instead: MNIST test accuracy by compression"
    )
    args = parser.parse_args(argv)
    if args.accuracy:
        acc = run_workers(_accuracy, 2, (1 if args.quick else 3, 64), timeout=600)[0]
        print(f"{'compression':>11} {'test accuracy':>14}")
        for name, value in acc.items():
            print(f"{name:>11} {value:>14.4f}")
        print(json.dumps({"benchmark": "dp_vs_ddp_accuracy", "world": 2, "accuracy": acc}))
        return 0
    if args.repeats < 5:
        parser.error("--repeats must be >= 5 (medians of at least 5 repeats)")
    configs = [(m, b) for m in args.models for b in args.batches]
    rows = []
    for world in args.worlds:
        res = run_workers(
            _bench, world, (configs, args.repeats, 0.5 if args.quick else 1.0), timeout=600
        )[0]
        for model_name, batch in configs:
            r = res[f"{model_name}/{batch}"]
            rows.append(
                {
                    "world": world,
                    "model": model_name,
                    "batch": batch,
                    "ddp_sps": r["ddp"],
                    "concord_sps": r["concord"],
                    "speedup": r["concord"] / r["ddp"],
                    "ceiling": r["local"] / r["ddp"],
                }
            )
    print(
        f"{'N':>3} {'model':>5} {'batch':>5} {'DDP samples/s':>14} {'concord':>10} "
        f"{'concord/DDP':>12} {'no-comm/DDP':>12}"
    )
    for r in rows:
        print(
            f"{r['world']:>3} {r['model']:>5} {r['batch']:>5} {r['ddp_sps']:>14.0f} "
            f"{r['concord_sps']:>10.0f} {r['speedup']:>11.2f}x {r['ceiling']:>11.2f}x"
        )
    geo = statistics.geometric_mean([r["speedup"] for r in rows])
    print(f"geometric mean concord/DDP: {geo:.2f}x")
    print(
        json.dumps(
            {"benchmark": "dp_vs_ddp", "repeats": args.repeats, "geomean": geo, "rows": rows}
        )
    )
    grouped_bars(
        "dp_vs_ddp",
        "training samples/s: concord AllReduce vs DDP (no-comm: the ceiling)",
        [f"N={r['world']}\n{r['model']} b{r['batch']}" for r in rows],
        {
            "DDP": [r["ddp_sps"] for r in rows],
            "concord": [r["concord_sps"] for r in rows],
            "no-comm": [r["ceiling"] * r["ddp_sps"] for r in rows],
        },
        "samples/s",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
