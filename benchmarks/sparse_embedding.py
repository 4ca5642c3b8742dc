"""Sparse embedding gradients: concord AllReduce and parameter servers vs PyTorch DDP (gloo).

    flock /tmp/concord-bench.lock .venv/bin/python benchmarks/sparse_embedding.py [--quick]

A bag-of-ids model, ``nn.EmbeddingBag(V, 64, mode="mean", sparse=True)`` over 20 random ids
per sample and a linear head (10 classes), SGD (no momentum: torch's sparse momentum buffer
grows every step), batch 64 per worker, N worker
processes (one thread each) on this host, for vocabularies V of 10k and 100k rows. DDP
all-reduces the embedding's sparse gradient itself (gloo gathers every worker's indices and
values); concord sums a mask of the touched rows, then those rows' values, with its engine's
dense sums: the shared-memory ring (default here) or gloo ("concord-torch",
``AllReduce(engine="torch")``). "no-comm" (each worker steps alone) is the ceiling. The
systems alternate repeat by repeat inside the same processes; samples/s from the slowest
worker, median over the repeats.

``--ps S`` adds a second job per vocabulary with S parameter servers: sync PS
(``ParameterServer()``: pushes carry the touched rows, and with plain SGD the replies too)
against DDP and no-comm in the same worker processes; ``--ps-mode async`` runs async PS
instead (each reply carries the rows changed since the worker's previous one), ``async-delta``
async PS with push="delta" (each worker steps its own SGD and pushes the rows' change).
``--optimizer sparse-adam`` trains every system with the usual recipe instead of SGD:
``SparseAdam`` on the table and ``Adam`` on the head, passed to ``distribute`` as a list (on
PS the servers run both; the table's pushes and replies are its touched rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from _plot import grouped_bars  # noqa: E402 - (the benchmarks folder is the script's own)
from dp_vs_ddp import samples_per_s  # noqa: E402
from multiproc import run_workers  # noqa: E402
from ps_harness import run_ps_job  # noqa: E402

DIM, IDS, BATCH, CLASSES = 64, 20, 64, 10


def _optimizer(model, kind: str):  # noqa: ANN001
    import torch

    import concord

    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.5)
    table = torch.optim.SparseAdam(list(model[0].parameters()), lr=1e-2)
    return concord.MultiOptimizer(table, torch.optim.Adam(model[1].parameters(), lr=1e-2))


def _system(name: str, vocab: int, mode: str = "sync", optimizer: str = "sgd"):
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    import concord

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.EmbeddingBag(vocab, DIM, mode="mean", sparse=True), nn.Linear(DIM, CLASSES)
    )
    opt = _optimizer(model, optimizer)
    if name == "ddp":
        return DistributedDataParallel(model), opt
    if name == "local":
        return model, opt
    if name == "ps":
        push = "delta" if mode.endswith("-delta") else "grad"
        strategy = concord.ParameterServer(mode.removesuffix("-delta"), push=push)
        return concord.distribute(model, opt, strategy)
    engine = "torch" if name == "concord-torch" else "auto"
    return concord.distribute(model, opt, concord.AllReduce(engine=engine))


def _data(vocab: int, rank: int):
    import torch

    gen = torch.Generator().manual_seed(rank)
    x = torch.randint(0, vocab, (BATCH * 50, IDS), generator=gen)
    return x, torch.randint(0, CLASSES, (BATCH * 50,), generator=gen)


def _bench(vocabs: list[int], steps: int, repeats: int, optimizer: str) -> dict:

    import concord

    ctx = concord.init(timeout=300)
    out = {}
    for vocab in vocabs:
        x, y = _data(vocab, ctx.rank)
        names = ("ddp", "concord", "concord-torch", "local")
        systems = {name: _system(name, vocab, optimizer=optimizer) for name in names}
        out[vocab] = samples_per_s(systems, x, y, BATCH, steps, repeats)
        systems["concord"][0].close()
        systems["concord-torch"][0].close()
    return out


def _bench_ps(vocab: int, steps: int, repeats: int, mode: str, optimizer: str) -> dict:
    """One job's servers serve one model: PS (``mode``) against DDP and no-comm."""
    import concord

    ctx = concord.init(timeout=300)
    x, y = _data(vocab, ctx.rank)
    systems = {name: _system(name, vocab, mode, optimizer) for name in ("ddp", "ps", "local")}
    ps = systems["ps"][1]
    before = ps.server_stats()  # (after registration)
    out = samples_per_s(systems, x, y, BATCH, steps, repeats)
    after = ps.server_stats()
    ps.close()

    def grew(key: str) -> int:
        return sum(a[key] - b[key] for a, b in zip(after, before))

    out["mb_per_push"] = grew("bytes_in") / grew("pushes") / 1e6  # all workers' pushes
    out["mb_per_reply"] = grew("bytes_out") / grew("pushes") / 1e6
    return out


def _parameter_servers(
    worlds: list[int],
    vocabs: list[int],
    servers: int,
    steps: int,
    repeats: int,
    mode: str,
    optimizer: str,
) -> None:
    rows = []
    for world in worlds:
        for vocab in vocabs:
            args = (vocab, steps, repeats, mode, optimizer)
            r = run_ps_job(_bench_ps, world, servers, args, timeout=900, server_timeout=300)
            r = r.results[0]
            rows.append(
                {
                    "world": world,
                    "servers": servers,
                    "mode": mode,
                    "optimizer": optimizer,
                    "vocab": vocab,
                    "ddp_sps": r["ddp"],
                    "ps_sps": r["ps"],
                    "local_sps": r["local"],
                    "ps_vs_ddp": r["ps"] / r["ddp"],
                    "mb_per_push": r["mb_per_push"],
                    "mb_per_reply": r["mb_per_reply"],
                }
            )
    print(
        f"{'N':>3} {'S':>2} {'vocab':>8} {'DDP samples/s':>14} {mode + ' PS':>15} {'no-comm':>10} "
        f"{'PS/DDP':>7} {'MB/push':>8} {'MB/reply':>9}"
    )
    for r in rows:
        print(
            f"{r['world']:>3} {r['servers']:>2} {r['vocab']:>8} {r['ddp_sps']:>14.0f} "
            f"{r['ps_sps']:>15.0f} {r['local_sps']:>10.0f} {r['ps_vs_ddp']:>6.2f}x "
            f"{r['mb_per_push']:>8.3f} {r['mb_per_reply']:>9.3f}"
        )
    print(json.dumps({"benchmark": "sparse_embedding_ps", "repeats": repeats, "rows": rows}))
    grouped_bars(
        ("sparse_embedding_ps" if mode == "sync" else f"sparse_embedding_ps_{mode}")
        + ("" if optimizer == "sgd" else "_sparse_adam"),
        f"sparse embedding gradients: samples/s, {mode} PS (S={servers}) vs DDP, {optimizer}",
        _groups(rows),
        {
            "DDP": [r["ddp_sps"] for r in rows],
            f"concord {mode} PS": [r["ps_sps"] for r in rows],
            "no-comm": [r["local_sps"] for r in rows],
        },
        "samples/s",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps per repeat")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ps", type=int, metavar="S", help="also PS with S servers")
    parser.add_argument("--ps-mode", choices=("sync", "async", "async-delta"), default="sync")
    parser.add_argument("--no-allreduce", action="store_true", help="only the --ps jobs")
    parser.add_argument("--optimizer", choices=("sgd", "sparse-adam"), default="sgd")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5 (medians of at least 5 repeats)")
    steps = 10 if args.quick else 30
    if not args.no_allreduce:
        _allreduce(args.worlds, args.vocabs, steps, args.repeats, args.optimizer)
    if args.ps:
        _parameter_servers(
            args.worlds, args.vocabs, args.ps, steps, args.repeats, args.ps_mode, args.optimizer
        )
    return 0


def _allreduce(
    worlds: list[int], vocabs: list[int], steps: int, repeats: int, optimizer: str
) -> None:
    rows = []
    for world in worlds:
        res = run_workers(_bench, world, (vocabs, steps, repeats, optimizer), timeout=900)[0]
        for vocab in vocabs:
            r = res[vocab]
            rows.append(
                {
                    "world": world,
                    "vocab": vocab,
                    "ddp_sps": r["ddp"],
                    "concord_sps": r["concord"],
                    "concord_torch_sps": r["concord-torch"],
                    "local_sps": r["local"],
                    "speedup": r["concord"] / r["ddp"],
                    "speedup_torch": r["concord-torch"] / r["ddp"],
                }
            )
    print(
        f"{'N':>3} {'vocab':>8} {'DDP samples/s':>14} {'concord':>10} {'c-torch':>10} "
        f"{'no-comm':>10} {'concord/DDP':>12} {'c-torch/DDP':>12}"
    )
    for r in rows:
        print(
            f"{r['world']:>3} {r['vocab']:>8} {r['ddp_sps']:>14.0f} {r['concord_sps']:>10.0f} "
            f"{r['concord_torch_sps']:>10.0f} {r['local_sps']:>10.0f} {r['speedup']:>11.2f}x "
            f"{r['speedup_torch']:>11.2f}x"
        )
    print(json.dumps({"benchmark": "sparse_embedding", "repeats": repeats, "rows": rows}))
    grouped_bars(
        "sparse_embedding" + ("" if optimizer == "sgd" else "_sparse_adam"),
        f"sparse embedding gradients: samples/s, concord AllReduce vs DDP, {optimizer}",
        _groups(rows),
        {
            "DDP": [r["ddp_sps"] for r in rows],
            "concord (ring)": [r["concord_sps"] for r in rows],
            "concord (torch engine)": [r["concord_torch_sps"] for r in rows],
        },
        "samples/s",
    )


def _groups(rows: list[dict]) -> list[str]:
    """The charts' group labels: one per (workers, vocabulary)."""
    return [f"N={r['world']}\nV={r['vocab']:,}" for r in rows]


if __name__ == "__main__":
    sys.exit(main())
