"""``loader()``: a DataLoader over this worker's shard."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, Dataset

from concord.data.sampler import ShardedSampler


def loader(
    dataset: Dataset,
    batch_size: int,
    rank: int | None = None,
    world: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader that reads worker ``rank``'s shard of ``dataset``.

    ``rank``/``world`` default to the current ``concord.init()`` context (a single process
    when there is none). Call ``loader.sampler.set_epoch(e)`` each epoch to reshuffle.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if rank is None or world is None:
        from concord.comm.runtime import current

        ctx = current()
        if rank is None:
            rank = ctx.rank if ctx else 0
        if world is None:
            world = ctx.world_size if ctx else 1
    sampler = ShardedSampler(len(dataset), rank, world, seed, shuffle, drop_last)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs
    )
