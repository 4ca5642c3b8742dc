"""Where training bytes come from: ``make_loader(spec, ...)`` for ``concord train --data``.

The choice changes only where the bytes come from; the training loop stays the same:

* ``local``   every worker reads MNIST from its own disk and takes its shard (no network);
* ``dfs:URL`` every worker reads only its shard files under an fsspec URL
  (write them first: ``concord data shard mnist --out URL --shards K``);
* ``central`` workers fetch their batches from the job's data server
  (``concord run --data-server mnist ...``);
* ``p2p``     each worker holds only its slice and peers reshuffle it between epochs.

Every loader iterates ``(x, y)`` batches; call ``set_epoch(e)`` (or, for ``local``,
``loader.sampler.set_epoch(e)``) at the start of each epoch.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import TensorDataset

from concord.data.loader import loader
from concord.data.mnist import mnist
from concord.errors import UsageError

SPECS = ("local", "central", "dfs:URL", "p2p")
NAMES = ("mnist", "mnist:train", "mnist:test", "dfs:URL")


def named_dataset(name: str) -> TensorDataset:
    """A dataset by name: ``mnist`` (= ``mnist:train``), ``mnist:test`` or ``dfs:URL``."""
    if name in ("mnist", "mnist:train"):
        return mnist("train")
    if name == "mnist:test":
        return mnist("test")
    if name.startswith("dfs:") and len(name) > 4:
        from concord.data.dfs import load_dataset

        return TensorDataset(*load_dataset(name[4:]))
    raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(NAMES)}")


def check_source(spec: str) -> None:
    """Raise UsageError unless ``spec`` names a data source (see :data:`SPECS`)."""
    if spec not in ("local", "central", "p2p") and not (spec.startswith("dfs:") and len(spec) > 4):
        raise UsageError(f"unknown data source {spec!r}; choose one of: {', '.join(SPECS)}")


def make_loader(spec: str, *, rank: int, world: int, batch_size: int, seed: int) -> Any:
    """A loader of training batches for worker ``rank`` of ``world`` from source ``spec``.

    The result iterates ``(x, y)`` batches, has ``__len__`` (batches per epoch), and has
    ``set_epoch(e)`` (``local``: ``sampler.set_epoch(e)``). ``p2p``'s ``set_epoch`` is a
    collective: every worker calls it with the same epoch.
    """
    check_source(spec)
    if spec == "local":
        return loader(mnist("train"), batch_size, rank=rank, world=world, seed=seed)
    if spec.startswith("dfs:") and len(spec) > 4:
        from concord.data.dfs import DFSLoader, ShardedFiles

        return DFSLoader(ShardedFiles(spec[4:], rank, world, seed=seed), batch_size)
    if spec == "central":
        from concord.data.central import CentralLoader

        return CentralLoader.from_job(rank=rank, world=world, batch_size=batch_size, seed=seed)
    from concord.data.p2p import P2PLoader  # (p2p)

    return P2PLoader.from_dataset(
        mnist("train"), rank=rank, world=world, batch_size=batch_size, seed=seed
    )
