"""Trainer: workers whose shards differ by a batch take the same number of steps (no hang);
a run resumed from a checkpoint ends where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_workers
from ps_harness import run_ps_job


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


def _fit_and_resume(strategy: str, out: str, resume: str | None) -> list:
    """Without ``resume``: one epoch (keeping its checkpoint), then a second. With it: load the
    checkpoint into a model from another seed and train the second epoch."""
    import shutil

    from torch.utils.data import TensorDataset

    import concord

    ctx = concord.init(timeout=30)
    torch.manual_seed(0 if resume is None else 5 + ctx.rank)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    kind = {
        "ps": concord.ParameterServer(mode="sync"),
        "allreduce": concord.AllReduce(),
        "pipeline": concord.Pipeline(stages=2, microbatches=2),
    }[strategy]
    model, opt = concord.distribute(model, opt, kind)
    shard = kind.data_shard(ctx)
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(256, 4, generator=gen), torch.randint(0, 2, (256,), generator=gen)
    )
    train = concord.data.loader(data, 32, seed=3, rank=shard.rank, world=shard.world)
    loss = torch.nn.functional.cross_entropy
    trainer = concord.Trainer(model, opt, loss, ctx, shard, out_dir=out)
    if resume is None:
        trainer.fit(train, epochs=1)
        name = "checkpoint.pt" if strategy != "pipeline" else f"checkpoint-stage{ctx.rank}.pt"
        if shard.rank == 0:  # the writer (of each stage)
            shutil.copy(f"{out}/{name}", f"{out}/{name.replace('checkpoint', 'after-1')}")
        trainer.fit(train, epochs=2, start_epoch=1)
    else:
        assert trainer.resume(resume) == 1
        trainer.fit(train, epochs=2, start_epoch=1)
        assert [h.epoch for h in trainer.history] == [2]
    if hasattr(opt, "synchronize"):
        opt.synchronize()
    params = [p.detach().clone() for p in model.parameters()]
    if hasattr(opt, "close"):
        opt.close()
    return params


@pytest.mark.timeout(180)
@pytest.mark.parametrize("strategy", ["ps", "allreduce", "pipeline"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(strategy, tmp_path):
    def job(out, resume):
        args = (strategy, str(out), resume)
        if strategy == "ps":
            return run_ps_job(_fit_and_resume, 2, 1, args=args).results
        return run_workers(_fit_and_resume, 2, args=args, timeout=100)

    straight = job(tmp_path / "a", None)
    resumed = job(tmp_path / "b", str(tmp_path / "a" / "after-1.pt"))
    for got, want in zip(resumed, straight):  # per worker; 1e-5 as in the equivalence tests
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if strategy == "pipeline":  # one file per stage, each with its stage's parameters
        saved = [
            torch.load(tmp_path / "b" / f"checkpoint-stage{i}.pt", weights_only=True)
            for i in range(2)
        ]
        assert [len(s["optimizer"]["state"]) for s in saved] == [2, 2]
    else:
        saved = [torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)]
        assert len(saved[0]["optimizer"]["state"]) == 4  # Adam's, for all 4 parameters
    assert all(s["epochs_done"] == 2 for s in saved)
