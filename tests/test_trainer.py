"""Trainer: workers whose shards differ by a batch take the same number of steps (no hang)."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_workers


def _fit_uneven() -> dict:
    from torch.utils.data import TensorDataset

    import concord

    ctx = concord.init(timeout=30)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = concord.distribute(model, opt, concord.AllReduce())
    # 129 samples over 2 workers: shards of 65 and 64 samples = 2 and 1 batches of 64
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(129, 4, generator=gen), torch.randint(0, 2, (129,), generator=gen)
    )
    train = concord.data.loader(data, 64, seed=3)
    trainer = concord.Trainer(model, opt, torch.nn.functional.cross_entropy, ctx)
    history = trainer.fit(train, epochs=2)
    return {
        "batches": len(train),
        "steps": trainer.steps_per_epoch(train),
        "samples_per_epoch": [round(h.samples_per_s * h.seconds) for h in history],
        "params": [p.detach().clone() for p in model.parameters()],
    }


@pytest.mark.timeout(120)
def test_uneven_shards_take_the_fewest_batches_and_stay_in_step():
    first, second = run_workers(_fit_uneven, 2, timeout=100)
    assert sorted([first["batches"], second["batches"]]) == [1, 2]  # the hazard is real
    assert first["steps"] == second["steps"] == 1
    # one batch of 64 per worker per epoch, counted over both workers
    assert first["samples_per_epoch"] == [128, 128]
    for a, b in zip(first["params"], second["params"]):
        assert torch.equal(a, b)
