"""Sparse embedding gradients: SparseAdam for the table, Adam for the rest.

python examples/sparse_embeddings.py                            # 1 process
concord run -n 2 examples/sparse_embeddings.py                  # 2 workers, AllReduce
concord run -n 2 --servers 1 examples/sparse_embeddings.py --ps # 2 workers, a parameter server

A bag-of-ids classifier on synthetic data (the class is the id range most of a sample's ids
come from). ``nn.EmbeddingBag(sparse=True)`` makes a sparse gradient, and only its touched
rows travel: AllReduce averages it rows only and leaves ``.grad`` sparse, so
``torch.optim.SparseAdam`` steps the table on every worker; with ``--ps`` the server runs both
optimizers (sync) and answers with the table's touched rows. ``distribute`` takes the two
optimizers as a list and returns one (a ``concord.MultiOptimizer``).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import concord

VOCAB, CLASSES, IDS = 5_000, 5, 12


def batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples whose ids come mostly (2 in 3) from the id range of their class."""
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    width = VOCAB // CLASSES
    own = y[:, None] * width + torch.randint(0, width, (n, IDS), generator=gen)
    noise = torch.randint(0, VOCAB, (n, IDS), generator=gen)
    keep = torch.rand(n, IDS, generator=gen) < 2 / 3
    return torch.where(keep, own, noise), y


def main(steps: int = 300, ps: bool = False) -> float:
    torch.set_num_threads(1)
    ctx = concord.init()
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(VOCAB, 32, mode="mean", sparse=True), nn.Linear(32, 5))
    table = torch.optim.SparseAdam(list(model[0].parameters()), lr=1e-2)
    dense = torch.optim.Adam(model[1].parameters(), lr=1e-2)
    strategy = concord.ParameterServer() if ps else concord.AllReduce()
    model, opt = concord.distribute(model, [table, dense], strategy)
    gen = torch.Generator().manual_seed(1 + ctx.rank)  # each worker its own data
    for _ in range(steps):
        x, y = batch(gen, 64)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # only touched rows travel
        opt.step()
    x, y = batch(torch.Generator().manual_seed(0), 2_000)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    if ctx.is_main:
        print(f"test_accuracy={accuracy:.4f}")
    concord.shutdown()
    return accuracy


if __name__ == "__main__":
    sys.exit(0 if main(ps="--ps" in sys.argv[1:]) > 0.9 else 1)
