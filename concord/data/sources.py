"""Where training bytes come from: ``make_loader(spec, ...)`` for ``concord train --data``.

The choice changes only where the bytes come from; the training loop stays the same.
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from concord.data.loader import loader
from concord.data.mnist import mnist
from concord.errors import UsageError

SPECS = ("local",)


def make_loader(spec: str, *, rank: int, world: int, batch_size: int, seed: int) -> DataLoader:
    """A loader of MNIST training batches for worker ``rank`` of ``world``.

    The result iterates ``(x, y)`` batches and has ``sampler.set_epoch(e)``.
    """
    if spec == "local":
        return loader(mnist("train"), batch_size, rank=rank, world=world, seed=seed)
    raise UsageError(f"unknown data source {spec!r}; choose one of: {', '.join(SPECS)}")
