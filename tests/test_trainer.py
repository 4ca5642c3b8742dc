"""Trainer: workers whose shards differ by a batch take the same number of steps (no hang);
a run resumed from a checkpoint ends where an uninterrupted one does; LR schedules."""

from __future__ import annotations

import json
import os

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
        assert [h.epoch for h in trainer.history] == [1, 2]  # epoch 1's from the checkpoint
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
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # epoch 1 from the file


RESTARTED = """
import os, sys, torch, concord
from torch.utils.data import TensorDataset

ctx = concord.init(timeout=30)
torch.manual_seed(0 if ctx.attempt == 0 else 9)  # a restart must not depend on its own init
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
model, opt = concord.distribute(model, opt, concord.ParameterServer(mode="sync"))
gen = torch.Generator().manual_seed(1)
data = TensorDataset(torch.randn(256, 4, generator=gen), torch.randint(0, 2, (256,), generator=gen))
train = concord.data.loader(data, 32, seed=3)
out = sys.argv[1]
trainer = concord.Trainer(model, opt, torch.nn.functional.cross_entropy, ctx, out_dir=out)
start = trainer.resume_latest()
print(f"attempt={ctx.attempt} rank={ctx.rank} start={start}", flush=True)
trainer.fit(train, epochs=2, start_epoch=start)
if os.environ.get("CRASH") == "1" and ctx.attempt == 0 and ctx.rank == 1:
    os._exit(3)  # after epoch 2's checkpoint
trainer.fit(train, epochs=3, start_epoch=max(start, 2))
opt.synchronize()
if ctx.rank == 0:
    torch.save([p.detach().clone() for p in model.parameters()], f"{out}/final.pt")
opt.close()
"""


@pytest.mark.timeout(180)
def test_a_restarted_job_goes_on_from_its_last_checkpoint(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "restarted.py"
    script.write_text(RESTARTED)

    def run(out: str, crash: str) -> subprocess.CompletedProcess:
        argv = ["run", "-n", "2", "--servers", "1", "--max-restarts", "1", str(script), out]
        return subprocess.run(
            [sys.executable, "-m", "concord.cli", *argv],
            capture_output=True,
            text=True,
            timeout=150,
            env=os.environ | {"CRASH": crash},
        )

    crashed = run(str(tmp_path / "a"), "1")
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    assert (
        "worker 1 exited with code 3" in crashed.stderr and "restarting (1 of 1)" in crashed.stderr
    )
    assert "[worker 1] attempt=1 rank=1 start=2" in crashed.stdout.splitlines()
    straight = run(str(tmp_path / "b"), "0")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "[worker 0] attempt=0 rank=0 start=0" in straight.stdout.splitlines()
    got = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    want = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    for a, b in zip(got, want):  # 1e-5 as in the equivalence tests
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert epochs == [1, 2, 3]  # the restart redid nothing


def _resume_mismatched(folder: str) -> str:
    import concord
    from concord.errors import ConcordError

    ctx = concord.init(timeout=30)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = concord.distribute(model, opt, concord.AllReduce())
    trainer = concord.Trainer(model, opt, torch.nn.functional.cross_entropy, ctx)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    torch.save({"epochs_done": 1 + ctx.rank, **state}, f"{folder}/ck{ctx.rank}.pt")
    try:
        trainer.resume(f"{folder}/ck{ctx.rank}.pt")
    except ConcordError as exc:
        return str(exc)
    return ""


@pytest.mark.timeout(120)
def test_checkpoints_that_disagree_on_the_epochs_done_are_refused(tmp_path):
    errors = run_workers(_resume_mismatched, 2, args=(str(tmp_path),), timeout=100)
    assert all("written after 1 to 2 epochs" in e for e in errors), errors


def test_max_grad_norm_clips_the_gradient_before_each_step():
    import copy
    from types import SimpleNamespace

    from test_allreduce_api import ctx
    from torch.nn import functional as F

    import concord
    from concord.errors import UsageError

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    concord.Trainer(model, opt, F.cross_entropy, ctx(), max_grad_norm=0.01).train_step(x, y)
    F.cross_entropy(twin(x), y).backward()
    assert float(torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01)) > 0.01  # it clipped
    torch.optim.SGD(twin.parameters(), lr=1.0).step()
    for got, want in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a sparse embedding gradient (torch's clip_grad_norm_ raises on it) clips as the dense one
    torch.manual_seed(0)
    bags = torch.nn.Sequential(torch.nn.EmbeddingBag(20, 4, sparse=True), torch.nn.Linear(4, 2))
    dense = copy.deepcopy(bags)
    dense[0].sparse = False
    ids = torch.randint(0, 20, (8, 3))
    opt = torch.optim.SGD(bags.parameters(), lr=1.0)
    concord.Trainer(bags, opt, F.cross_entropy, ctx(), max_grad_norm=0.01).train_step(ids, y)
    F.cross_entropy(dense(ids), y).backward()
    assert float(torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.01)) > 0.01
    torch.optim.SGD(dense.parameters(), lr=1.0).step()
    for got, want in zip(bags.parameters(), dense.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    stage = torch.nn.Linear(1, 1)
    stage.train_batch = lambda *args: 0.0  # a pipeline stage runs its own schedule
    with pytest.raises(UsageError, match="a pipeline stage holds only its own part"):
        concord.Trainer(stage, opt, F.cross_entropy, ctx(), max_grad_norm=1.0)
    ps_sync = SimpleNamespace(strategy=concord.ParameterServer(mode="sync"))
    with pytest.raises(UsageError, match=r"clip there with ParameterServer\(max_grad_norm"):
        concord.Trainer(model, ps_sync, F.cross_entropy, ctx(), max_grad_norm=1.0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_steps_as_torch_amp_does_and_keeps_the_loss_scale(precision, tmp_path):
    import copy
    from types import SimpleNamespace

    from test_allreduce_api import ctx
    from torch.nn import functional as F

    import concord
    from concord.errors import UsageError

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    twin, plain = copy.deepcopy(model), copy.deepcopy(model)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = concord.Trainer(
        model, opt, F.cross_entropy, ctx(), out_dir=tmp_path, precision=precision
    )
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cpu", growth_interval=2) if precision == "fp16" else None
    if trainer.scaler is not None:
        trainer.scaler = torch.amp.GradScaler("cpu", growth_interval=2)  # (to see it grow)
    fp32_loss = float(F.cross_entropy(plain(x), y).detach())  # at the initial weights
    for step in range(3):
        loss = trainer.train_step(x, y)
        assert step or loss != fp32_loss  # autocast really ran in half precision
        twin_opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            twin_loss = F.cross_entropy(twin(x), y)
        if scaler is None:
            twin_loss.backward()
            twin_opt.step()
        else:
            scaler.scale(twin_loss).backward()
            scaler.step(twin_opt)
            scaler.update()
        assert loss == float(twin_loss.detach())
    for got, want in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():  # evaluation runs under the same autocast
        fp32_eval = float(F.cross_entropy(twin(x), y))
        with torch.autocast("cpu", dtype=dtype):
            want_eval = float(F.cross_entropy(twin(x), y))
    assert trainer.evaluate([(x, y)]).loss == want_eval != fp32_eval
    if precision == "fp16":  # the scale is part of the checkpoint
        assert trainer.scaler.get_scale() == scaler.get_scale() == 2.0**17  # 2**16 grew once
        trainer.save_checkpoint(1)
        again = concord.Trainer(
            model, opt, F.cross_entropy, ctx(), out_dir=tmp_path, precision="fp16"
        )
        assert again.scaler.get_scale() == 2.0**16 and again.resume(tmp_path / "checkpoint.pt")
        assert again.scaler.get_scale() == 2.0**17
    with pytest.raises(UsageError, match="precision must be one of"):
        concord.Trainer(model, opt, F.cross_entropy, ctx(), precision="fp8")
    stage = torch.nn.Linear(1, 1)
    stage.train_batch = lambda *args: 0.0
    with pytest.raises(UsageError, match="use precision='bf16'"):
        concord.Trainer(stage, opt, F.cross_entropy, ctx(), precision="fp16")
    overlap = SimpleNamespace(strategy=concord.ParameterServer(overlap=True))
    with pytest.raises(UsageError, match="use overlap=False"):
        concord.Trainer(model, overlap, F.cross_entropy, ctx(), precision="fp16")


@pytest.mark.parametrize("every", ["epoch", "step"])
def test_an_lr_schedule_steps_as_a_plain_loop_and_resumes(every, tmp_path):
    import copy

    from test_allreduce_api import ctx
    from torch.nn import functional as F

    import concord

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=gen), torch.randint(0, 2, (8,), generator=gen))]
    batches *= 2
    opt = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = concord.Trainer(
        model, opt, F.cross_entropy, ctx(), out_dir=tmp_path, lr_scheduler=sched,
        schedule_every=every,
    )  # fmt: skip
    trainer.fit(batches, epochs=3)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.4, momentum=0.5)
    twin_sched = torch.optim.lr_scheduler.StepLR(twin_opt, step_size=1, gamma=0.5)
    for _ in range(3):
        for x, y in batches:
            twin_opt.zero_grad()
            F.cross_entropy(twin(x), y).backward()
            twin_opt.step()
            if every == "step":
                twin_sched.step()
        if every == "epoch":
            twin_sched.step()
    assert (
        opt.param_groups[0]["lr"]
        == twin_opt.param_groups[0]["lr"]
        == 0.4 * 0.5 ** (3 if every == "epoch" else 6)
    )
    for got, want in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    fresh_opt = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.5)
    fresh = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
    again = concord.Trainer(model, fresh_opt, F.cross_entropy, ctx(), lr_scheduler=fresh)
    assert again.resume(tmp_path / "checkpoint.pt") == 3
    assert fresh.state_dict() == sched.state_dict()
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_reduce_on_plateau_watches_the_test_loss_and_bad_schedules_are_refused():
    from test_allreduce_api import ctx
    from torch.nn import functional as F

    import concord
    from concord.errors import UsageError

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # (the loss stays where it is)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1)
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    test = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    trainer = concord.Trainer(model, opt, F.cross_entropy, ctx(), lr_scheduler=plateau)
    trainer.fit(batches, epochs=2, test=test)
    assert plateau.best == pytest.approx(trainer.evaluate(test).loss, rel=1e-6)
    assert plateau.best != pytest.approx(trainer.evaluate(batches).loss, rel=1e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-7)  # epoch 2 did not improve
    with pytest.raises(UsageError, match="'epoch' or 'step'"):
        concord.Trainer(model, opt, F.cross_entropy, ctx(), schedule_every="batch")
    with pytest.raises(UsageError, match="use schedule_every='epoch'"):
        concord.Trainer(model, opt, F.cross_entropy, ctx(), lr_scheduler=plateau,
                        schedule_every="step")  # fmt: skip
    with pytest.raises(UsageError, match="torch LR scheduler"):
        concord.Trainer(model, opt, F.cross_entropy, ctx(), lr_scheduler=0.5)


def _plateau_on_own_losses(losses: list[list[float]]) -> float:
    import concord
    from concord.trainer import Trainer

    ctx = concord.init(timeout=30)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    trainer = Trainer(model, opt, torch.nn.functional.mse_loss, ctx, lr_scheduler=plateau)
    for loss in losses[ctx.rank]:
        trainer._schedule_epoch(loss, own=True)
    return opt.param_groups[0]["lr"]


@pytest.mark.timeout(60)
def test_reduce_on_plateau_without_a_test_set_takes_the_workers_mean_loss():
    """Worker 0's own loss got worse (1 -> 2), worker 1's better (1 -> 0.5): the mean (1.25)
    is worse, so both halve the rate; on their own losses they would disagree."""
    assert run_workers(_plateau_on_own_losses, 2, args=([[1.0, 2.0], [1.0, 0.5]],)) == [0.5, 0.5]
