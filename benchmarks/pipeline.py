"""Pipeline bubble and activation memory: GPipe vs 1F1B, measured against theory.

    flock /tmp/concord-bench.lock .venv/bin/python benchmarks/pipeline.py [--quick]

1. **Bubble.** P stages in P processes (gloo, 127.0.0.1); each stage is a Linear layer plus a
   fixed wait of ``--fwd-ms`` in forward and ``--bwd-ms`` in backward (a sleep, so stages take
   equal time even when other jobs load the CPUs: this measures the schedule and the runtime,
   not the host). Per batch, the makespan runs from the first compute on any stage to the last
   one; bubble = 1 - (sum of every stage's compute time) / (P * makespan), the median (and the
   best) over the batches, next to the theory (P-1)/(M+P-1); ratio = median / theory.
   Goal: ratio <= 1.1. Message latency and late wake-ups on a loaded host add to the bubble.
2. **Memory.** The MNIST MLP (784-512-256-128-10) in 3 stages split by parameter count, batch
   256, M=8: the peak bytes of activations each stage holds (tensors saved for backward plus
   received inputs) under GPipe (all M micro-batches in flight) vs 1F1B (at most P - s).

Prints a table per part and one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from multiproc import run_workers  # noqa: E402

from concord.algorithms.schedules import theoretical_bubble  # noqa: E402
from concord.models import build_model  # noqa: E402


class _Wait(torch.autograd.Function):
    """Identity that sleeps ``fwd`` seconds in forward and ``bwd`` seconds in backward."""

    @staticmethod
    def forward(ctx, x, fwd, bwd):  # noqa: ANN001, ANN205 - autograd signature
        ctx.bwd = bwd
        time.sleep(fwd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        time.sleep(ctx.bwd)
        return grad, None, None


class WaitLayer(nn.Module):
    """A Linear layer whose forward takes ``fwd_ms`` and backward ``bwd_ms`` (at least)."""

    def __init__(self, width: int, fwd_ms: float, bwd_ms: float) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.fwd, self.bwd = fwd_ms / 1000, bwd_ms / 1000

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Wait.apply(self.linear(x), self.fwd, self.bwd)


def _batch_bubble(stats: list, stages: int) -> float:
    spans = [s for st in stats for s in st.spans]
    makespan = max(s.end for s in spans) - min(s.start for s in spans)
    busy = sum(st.compute_seconds for st in stats)
    return 1 - busy / (stages * makespan)


def _bubble_worker(stages: int, configs: list, args: dict) -> list[dict]:
    """On one stage: run each (schedule, M) for a few batches; return per-batch stats."""
    import torch.distributed as dist

    import concord

    ctx = concord.init(timeout=120)
    out = []
    for schedule, m in configs:
        torch.manual_seed(0)
        width = args["width"]
        model = nn.Sequential(
            *[WaitLayer(width, args["fwd_ms"], args["bwd_ms"]) for _ in range(stages)]
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        strategy = concord.Pipeline(stages, m, schedule, split=list(range(1, stages)))
        stage, opt = strategy.distribute(model, opt, ctx)
        x, y = torch.randn(m * 4, width), torch.randn(m * 4, width)
        stats = []
        for i in range(args["batches"] + 1):
            dist.barrier()
            opt.zero_grad()
            stage.train_batch(x, y, F.mse_loss)
            if i:  # the first batch warms up
                stats.append(stage.last_stats)
        out.append({"schedule": schedule, "microbatches": m, "stats": stats})
    return out


def bench_bubble(stage_counts: list[int], mbs: list[int], args: dict) -> list[dict]:
    rows = []
    for stages in stage_counts:
        configs = [(s, m) for s in ("gpipe", "1f1b") for m in mbs]
        per_rank = run_workers(_bubble_worker, stages, args=(stages, configs, args), timeout=600)
        for c, (schedule, m) in enumerate(configs):
            batches = zip(*[per_rank[r][c]["stats"] for r in range(stages)])
            bubbles = [_batch_bubble(list(b), stages) for b in batches]
            measured, theory = statistics.median(bubbles), theoretical_bubble(stages, m)
            rows.append(
                {"stages": stages, "microbatches": m, "schedule": schedule,
                 "measured": measured, "best": min(bubbles), "theory": theory,
                 "ratio": measured / theory}
            )  # fmt: skip
    return rows


def _memory_worker(configs: list, batch: int) -> list[dict]:
    import concord

    ctx = concord.init(timeout=120)
    out = []
    for schedule, m in configs:
        torch.manual_seed(0)
        model = build_model("mlp")
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        stage, opt = concord.Pipeline(3, m, schedule).distribute(model, opt, ctx)
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        walls = []
        for _ in range(4):
            opt.zero_grad()
            stage.train_batch(x, y, F.cross_entropy)
            opt.step()
            walls.append(stage.last_stats.wall_seconds)
        st = stage.last_stats
        out.append(
            {"schedule": schedule, "microbatches": m, "peak_bytes": st.peak_activation_bytes,
             "peak_in_flight": st.peak_in_flight, "batch_ms": 1000 * statistics.median(walls[1:])}
        )  # fmt: skip
    return out


def bench_memory(mbs: list[int], batch: int) -> list[dict]:
    configs = [(s, m) for m in mbs for s in ("gpipe", "1f1b")]
    per_rank = run_workers(_memory_worker, 3, args=(configs, batch), timeout=600)
    return [
        {**{k: per_rank[0][c][k] for k in ("schedule", "microbatches")},
         "peak_bytes": [per_rank[r][c]["peak_bytes"] for r in range(3)],
         "peak_in_flight": [per_rank[r][c]["peak_in_flight"] for r in range(3)],
         "batch_ms": max(per_rank[r][c]["batch_ms"] for r in range(3))}
        for c in range(len(configs))
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations (~30 s)")
    parser.add_argument("--fwd-ms", type=float, default=20.0)
    parser.add_argument("--bwd-ms", type=float, default=40.0)
    parser.add_argument("--batches", type=int, default=None, help="measured batches per config")
    opts = parser.parse_args()
    args = {"fwd_ms": opts.fwd_ms, "bwd_ms": opts.bwd_ms, "width": 64,
            "batches": opts.batches or (4 if opts.quick else 6)}  # fmt: skip
    stage_counts, mbs = ([4], [4, 8]) if opts.quick else ([2, 4], [4, 8, 16])
    bubble = bench_bubble(stage_counts, mbs, args)
    print(f"bubble: stage = Linear({args['width']}) + {opts.fwd_ms:g} ms fwd / "
          f"{opts.bwd_ms:g} ms bwd; median of {args['batches']} batches")  # fmt: skip
    print(f"{'P':>3} {'M':>3} {'schedule':>8} {'median':>7} {'best':>6} {'theory':>7} {'ratio':>6}")
    for r in bubble:
        print(f"{r['stages']:>3} {r['microbatches']:>3} {r['schedule']:>8} {r['measured']:>7.3f} "
              f"{r['best']:>6.3f} {r['theory']:>7.3f} {r['ratio']:>6.2f}")  # fmt: skip
    memory = bench_memory([8] if opts.quick else [4, 8, 16], batch=256)
    print("\nactivation memory: MLP in 3 stages (params split), batch 256; peak KiB per stage")
    print(f"{'M':>3} {'schedule':>8} {'stage 0':>9} {'stage 1':>9} {'stage 2':>9} "
          f"{'in flight':>10} {'batch ms':>9}")  # fmt: skip
    for r in memory:
        kib = [f"{b / 1024:>9.0f}" for b in r["peak_bytes"]]
        flight = "/".join(str(v) for v in r["peak_in_flight"])
        print(f"{r['microbatches']:>3} {r['schedule']:>8} {' '.join(kib)} {flight:>10} "
              f"{r['batch_ms']:>9.1f}")  # fmt: skip
    worst = max(r["ratio"] for r in bubble)
    print(f"\nworst measured/theory bubble ratio: {worst:.2f} (goal <= 1.10)")
    print(json.dumps({"benchmark": "pipeline", "bubble": bubble, "memory": memory}))
    from _plot import grouped_bars  # (this folder: the script's own)

    grouped_bars(
        "pipeline",
        "pipeline bubble: measured vs (P-1)/(M+P-1)",
        [f"P={r['stages']} M={r['microbatches']}\n{r['schedule']}" for r in bubble],
        {"measured": [r["measured"] for r in bubble], "theory": [r["theory"] for r in bubble]},
        "bubble fraction",
    )


if __name__ == "__main__":
    main()
