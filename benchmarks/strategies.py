"""MNIST training throughput: sync PS, async PS and AllReduce at N = 2 and 4, S = 1 and 2.

    flock /tmp/concord-bench.lock .venv/bin/python benchmarks/strategies.py [--quick]

Each configuration is one ``concord run -n N [--servers S]`` job on this host: every worker
(one thread) trains the MLP (784-512-256-128-10, SGD with momentum, batch 64 per worker,
MNIST preloaded, its own shard) for ``--warmup`` steps, then ``--steps`` timed steps
(loading, forward, backward, step). A job's samples/s = N * batch / (the slowest worker's
median step time); with ``--repeats`` > 1 the median over jobs is reported. All
configurations run in the same invocation, so the ratio "sync PS (S=2) / AllReduce at N=4"
compares peers under the same machine load. ``CPU ms/step`` is the CPU time (all threads)
that every process of the job (workers and servers) spent per timed step: on a host where
the cores are the bottleneck it says where the time goes, and it is steadier than samples/s.
``idle``: the share of the host's CPU time (``/proc/stat``) left idle over worker 0's timed
steps — the cores the job could not keep busy, on a host running nothing else.
``--quick``: N=4 only (AllReduce, sync PS S=2 without and with overlap, async PS S=2), fewer
steps. ``+overlap`` rows use ``ParameterServer(overlap=True)``; ``--worker --strategy
ps-sync+clip`` (by hand, see the README) uses ``max_grad_norm`` (:data:`CLIP_NORM`).
``--pairs K``: only the goal's two configurations at N=4, AllReduce and sync PS (S=2), in K
back-to-back pairs; each pair gives one ratio (this VM's speed drifts between runs, so one
pair's ratio is steadier than one job's rate), reported with the median and the range.
``--sched-ab K``: K rounds of AllReduce, then sync PS (S=2) twice in alternating order, once
with the workers' scheduling policy as ``concord run`` sets it (``CONCORD_WORKER_SCHED``:
``batch`` on this crowded host, see :mod:`concord.comm.sched`) and once with ``inherit``;
each round gives both ratios to that round's AllReduce (``--ab-strategy ps-async``: async PS).
``--optimizer adam``: ``torch.optim.Adam(lr=1e-3)`` instead of SGD with momentum (the workers'
``Adam`` as a DDP user builds it, torch's default implementation; the servers step theirs with
torch's fused kernel); ``adam-fused``: the workers' Adam too with ``fused=True``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MARK = "STRATEGIES_RESULT "
ROOT = Path(__file__).resolve().parents[1]
CLIP_NORM = 0.5  # ps-sync+clip: the MLP's averaged gradient norm is mostly above it early on


def worker(args: argparse.Namespace) -> None:
    """One worker of a benchmark job (started by ``concord run``)."""
    import torch
    from torch.nn import functional as F

    import concord
    from concord.models import build_model

    torch.set_num_threads(1)
    ctx = concord.init()
    torch.manual_seed(0)
    model = build_model("mlp")
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        fused = True if args.optimizer == "adam-fused" else None
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    if args.strategy == "allreduce":
        strategy = concord.AllReduce()
    else:
        mode, *extras = args.strategy.removeprefix("ps-").split("+")
        clip = CLIP_NORM if "clip" in extras else None
        strategy = concord.ParameterServer(
            mode=mode, overlap="overlap" in extras, max_grad_norm=clip
        )
    model, opt = concord.distribute(model, opt, strategy, ctx=ctx)
    data = concord.data.mnist("train")
    batches = _forever(concord.data.loader(data, batch_size=args.batch, rank=ctx.rank))
    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:  # CPU of this worker (all its threads) and of the servers
            cpu, server_cpu = time.process_time(), _server_cpu(opt, ctx.rank)
            host = _host_times() if ctx.rank == 0 else None
        start = time.perf_counter()
        x, y = next(batches)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    cpu = (time.process_time() - cpu) / args.steps
    server_cpu = (_server_cpu(opt, ctx.rank) - server_cpu) / args.steps
    if hasattr(opt, "close"):
        opt.close()
    step = statistics.median(times[args.warmup :])
    result = {"rank": ctx.rank, "seconds": step, "cpu": cpu, "server_cpu": server_cpu}
    result["idle"] = _idle_since(host)
    print(MARK + json.dumps(result), flush=True)
    concord.shutdown()


def _forever(loader):  # noqa: ANN001, ANN202
    """The loader's batches, epoch after epoch (so any ``--steps`` fits)."""
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        yield from loader


def _server_cpu(opt, rank: int) -> float:  # noqa: ANN001
    """The servers' CPU seconds so far, summed (asked by worker 0 only; 0 without servers)."""
    if rank != 0 or not hasattr(opt, "server_stats"):
        return 0.0
    return sum(s["cpu_seconds"] for s in opt.server_stats())


def _host_times() -> tuple[int, int] | None:
    """(idle, total) CPU ticks of the whole host so far, from ``/proc/stat`` (Linux)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, of user..steal


def _idle_since(start: tuple[int, int] | None) -> float | None:
    """The fraction of the host's CPU time that was idle since ``start``."""
    end = _host_times()
    if start is None or end is None or end[1] <= start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def run_job(
    strategy: str,
    workers: int,
    servers: int,
    args: argparse.Namespace,
    env: dict[str, str] | None = None,
) -> tuple[float, float, float | None]:
    """One job: samples/s (N * batch / the slowest worker's median step time), the CPU
    milliseconds that all of its processes (workers and servers) spent per timed step, and
    the fraction of the host's CPU time left idle over worker 0's timed steps (None off
    Linux; on a host running nothing else it is the cores the job could not keep busy).
    ``env``: variables to set for the job (over this process's environment)."""
    cmd = [sys.executable, "-m", "concord.cli", "run", "-n", str(workers)]
    if servers:
        cmd += ["--servers", str(servers)]
    cmd += [__file__, "--worker", "--strategy", strategy, "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--batch", str(args.batch)]
    cmd += ["--optimizer", args.optimizer]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path} | (env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    results = [
        json.loads(line.split(MARK, 1)[1]) for line in proc.stdout.splitlines() if MARK in line
    ]
    if proc.returncode != 0 or len(results) != workers:
        raise RuntimeError(
            f"{strategy} N={workers} S={servers} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    cpu = sum(r["cpu"] + r["server_cpu"] for r in results)
    idle = next((r["idle"] for r in results if r["idle"] is not None), None)
    return workers * args.batch / max(r["seconds"] for r in results), 1e3 * cpu, idle


def configs(quick: bool) -> list[tuple[str, int, int]]:
    if quick:
        return [
            ("allreduce", 4, 0),
            ("ps-sync", 4, 2),
            ("ps-sync+overlap", 4, 2),
            ("ps-async", 4, 2),
        ]
    out = []
    for n in (2, 4):
        out.append(("allreduce", n, 0))
        for s in (1, 2):
            out += [("ps-sync", n, s), ("ps-async", n, s)]
        out += [("ps-sync+overlap", n, 2), ("ps-async+overlap", n, 2)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int, default=0, help="AllReduce/sync PS pairs at N=4")
    parser.add_argument(
        "--sched-ab", type=int, default=0, help="rounds: AllReduce, sync PS batch/inherit"
    )
    parser.add_argument(
        "--ab-strategy", default="ps-sync", choices=("ps-sync", "ps-async"), help="--sched-ab's PS"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--optimizer", choices=("sgd", "adam", "adam-fused"), default="sgd")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="allreduce", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.pairs:
        return _pairs(args)
    if args.sched_ab:
        return _sched_ab(args)
    if args.quick:
        args.steps = 50
    rows = []
    print(
        f"{'strategy':<16} {'N':>2} {'S':>2} {'samples/s':>10} {'CPU ms/step':>12} {'idle':>5}",
        flush=True,
    )
    for strategy, n, s in configs(args.quick):
        jobs = [run_job(strategy, n, s, args) for _ in range(args.repeats)]
        rate = statistics.median(rate for rate, _, _ in jobs)
        cpu = statistics.median(cpu for _, cpu, _ in jobs)
        idle = _median_or_none([idle for _, _, idle in jobs])
        rows.append(
            {
                "strategy": strategy,
                "workers": n,
                "servers": s,
                "samples_per_s": rate,
                "cpu_ms_per_step": cpu,
                "idle": idle,
            }
        )
        print(
            f"{strategy:<16} {n:>2} {s or '-':>2} {rate:10.0f} {cpu:12.1f} {_percent(idle):>5}",
            flush=True,
        )
    by = {(r["strategy"], r["workers"], r["servers"]): r for r in rows}
    ps, ar = by[("ps-sync", 4, 2)], by[("allreduce", 4, 0)]
    ratio = ps["samples_per_s"] / ar["samples_per_s"]
    cpu_ratio = ps["cpu_ms_per_step"] / ar["cpu_ms_per_step"]
    print(f"sync PS (S=2) / AllReduce at N=4: {ratio:.2f} (goal >= 0.9)")
    print(f"CPU per step, sync PS (S=2) / AllReduce at N=4: {cpu_ratio:.2f} (2 shared cores)")
    summary = {"benchmark": "strategies", "steps": args.steps, "repeats": args.repeats}
    summary["results"] = rows
    summary["sync_ps_s2_vs_allreduce_n4"] = ratio
    summary["cpu_ps_s2_vs_allreduce_n4"] = cpu_ratio
    print(json.dumps(summary))
    from _plot import grouped_bars  # (this folder: the script's own)

    worlds = sorted({r["workers"] for r in rows})
    series: dict[str, list[float | None]] = {}  # a bar per strategy and S, in table order
    for name, s in dict.fromkeys((r["strategy"], r["servers"]) for r in rows):
        rates = [by[name, n, s]["samples_per_s"] if (name, n, s) in by else None for n in worlds]
        series[f"{name} S={s}" if s else name] = rates
    title = "MNIST MLP samples/s by strategy"
    grouped_bars("strategies", title, [f"N={n}" for n in worlds], series, "samples/s")
    return 0


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _median_range(ratios: list[float]) -> str:
    return f"median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}"


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _pairs(args: argparse.Namespace) -> int:
    """K back-to-back pairs (AllReduce, sync PS S=2) at N=4: one ratio per pair."""
    rows = []
    for k in range(args.pairs):
        ar, ar_cpu, ar_idle = run_job("allreduce", 4, 0, args)
        ps, ps_cpu, ps_idle = run_job("ps-sync", 4, 2, args)
        rows.append(
            {
                "allreduce": ar,
                "ps_sync_s2": ps,
                "ratio": ps / ar,
                "cpu_ratio": ps_cpu / ar_cpu,
                "idle": [ar_idle, ps_idle],
            }
        )
        print(
            f"pair {k}: AllReduce {ar:8.0f}  sync PS S=2 {ps:8.0f}  ratio {ps / ar:.2f}  "
            f"CPU ratio {ps_cpu / ar_cpu:.2f}  idle {_percent(ar_idle)} / {_percent(ps_idle)}",
            flush=True,
        )
    ratios = [r["ratio"] for r in rows]
    print(
        f"sync PS (S=2) / AllReduce at N=4 over {len(rows)} pairs: {_median_range(ratios)} "
        "(goal >= 0.9)"
    )
    print(json.dumps({"benchmark": "strategies-pairs", "steps": args.steps, "pairs": rows}))
    from _plot import grouped_bars  # (this folder: the script's own)

    grouped_bars(
        "strategies_pairs",
        "N=4 back to back: AllReduce vs sync PS (S=2), samples/s",
        [f"pair {k}\nratio {r['ratio']:.2f}" for k, r in enumerate(rows)],
        {
            "AllReduce": [r["allreduce"] for r in rows],
            "sync PS S=2": [r["ps_sync_s2"] for r in rows],
        },
        "samples/s",
    )
    return 0


def _sched_ab(args: argparse.Namespace) -> int:
    """K rounds of AllReduce and PS (S=2, ``--ab-strategy``) at N=4 with the workers' policy as
    concord run sets it and with ``inherit`` (alternating which goes first): two ratios per
    round."""
    from concord.comm.sched import SCHED_ENV

    if SCHED_ENV in os.environ:  # (it would set both runs' policy alike)
        raise SystemExit(f"--sched-ab compares policies: unset {SCHED_ENV} first")
    rows = []
    for k in range(args.sched_ab):
        ar, _, ar_idle = run_job("allreduce", 4, 0, args)
        runs = {}
        for policy in ("default", "inherit") if k % 2 == 0 else ("inherit", "default"):
            env = {SCHED_ENV: "inherit"} if policy == "inherit" else {}
            runs[policy] = run_job(args.ab_strategy, 4, 2, args, env)
        row = {"allreduce": ar, "allreduce_idle": ar_idle}
        for policy, (rate, cpu, idle) in runs.items():
            row[policy] = {"samples_per_s": rate, "ratio": rate / ar, "cpu": cpu, "idle": idle}
        rows.append(row)
        print(
            f"round {k}: AllReduce {ar:8.0f} (idle {_percent(ar_idle)})  {args.ab_strategy} S=2 "
            + "  ".join(
                f"{policy} {row[policy]['samples_per_s']:8.0f} ratio {row[policy]['ratio']:.2f} "
                f"idle {_percent(row[policy]['idle'])}"
                for policy in ("default", "inherit")
            ),
            flush=True,
        )
    for policy in ("default", "inherit"):
        ratios = [r[policy]["ratio"] for r in rows]
        print(
            f"{args.ab_strategy} (S=2) / AllReduce at N=4, workers' policy {policy}: "
            + _median_range(ratios)
        )
    summary = {"benchmark": "strategies-sched-ab", "strategy": args.ab_strategy}
    print(json.dumps(summary | {"steps": args.steps, "rounds": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
