"""AllReduce's surface in one process: validation, the wrapper, world 1 (no processes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import concord
from concord.comm.runtime import Context
from concord.errors import UsageError
from concord.strategies.allreduce import AllReduce, AllReduceModel


def ctx(world: int = 1, device: str = "cpu") -> Context:
    return Context(
        rank=0, world_size=world, local_rank=0, role="worker", servers=0, backend="gloo",
        device=torch.device(device), timeout=5.0, master_addr="127.0.0.1", master_port=0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bucket_mb": 0}, "bucket_mb=0"),
        ({"first_bucket_mb": -1}, "first_bucket_mb=-1"),
        ({"engine": "nccl"}, "auto, torch, ring"),
        ({"compression": "int8"}, "fp16, bf16"),
        ({"check_every": 0}, "check_every=0"),
        ({"chunk_kb": True}, "chunk_kb=True"),
    ],
)
def test_bad_options_name_the_value_and_the_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AllReduce(**kwargs)


def test_frozen_and_defaults():
    strategy = AllReduce()
    assert (strategy.bucket_mb, strategy.engine, strategy.compression) == (25.0, "auto", None)
    with pytest.raises(AttributeError):
        strategy.bucket_mb = 1  # type: ignore[misc]


def test_ring_engine_refuses_gpu_tensors():
    with pytest.raises(UsageError, match='engine="torch"'):
        AllReduce(engine="ring").resolve_engine(ctx(2, "cuda"), "x/")


def test_world_one_wrapper_is_transparent():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    model, dopt = AllReduce(check_every=1).distribute(plain, opt, ctx())
    assert isinstance(model, AllReduceModel) and model.module is plain
    assert isinstance(dopt, concord.DistributedOptimizer)
    assert list(model.state_dict()) == ["0.weight", "0.bias"]  # no "module." prefix
    before = plain[0].bias.detach().clone()
    with model.no_sync():
        model(torch.ones(1, 3)).sum().backward()
    dopt.step()
    # d(sum of outputs)/d(bias) = 1 for each output: one SGD step of 0.5
    assert torch.allclose(plain[0].bias, before - 0.5)
    fresh = nn.Sequential(nn.Linear(3, 2))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh[0].weight, plain[0].weight)


def test_torch_lr_schedulers_take_the_distributed_optimizer():
    """It is a torch.optim.Optimizer to isinstance, so a scheduler takes it; the schedule
    moves the wrapped optimizer's groups (the same dicts), which step() then uses. torch's
    optimizer hooks, which its step() would not run, are refused."""
    plain = nn.Linear(3, 1)
    opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    model, dopt = AllReduce().distribute(plain, opt, ctx())
    assert isinstance(dopt, torch.optim.Optimizer) and dopt.param_groups is opt.param_groups
    sched = torch.optim.lr_scheduler.StepLR(dopt, step_size=1, gamma=0.1)
    for lr in (0.5, 0.05):
        before = plain.bias.detach().clone()
        dopt.zero_grad()
        model(torch.zeros(1, 3)).sum().backward()  # d/d(bias) = 1
        dopt.step()
        sched.step()
        torch.testing.assert_close(plain.bias, before - lr)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    with pytest.raises(TypeError, match="distributed already"):
        AllReduce().distribute(plain, dopt, ctx())
    with pytest.raises(TypeError, match="distributed already"):
        AllReduce().distribute(plain, concord.MultiOptimizer(dopt), ctx())
    with pytest.raises(UsageError, match="runs no torch.optim hooks"):  # (not silently)
        dopt.register_step_post_hook(lambda *_: None)


def test_optimizer_must_hold_the_models_parameters():
    stray = nn.Parameter(torch.zeros(4, 5))
    with pytest.raises(UsageError, match=r"shape \(4, 5\)"):
        AllReduce().distribute(nn.Linear(2, 2), torch.optim.SGD([stray], lr=0.1), ctx())
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        AllReduce().distribute(nn.Linear(2, 2), object(), ctx())  # type: ignore[arg-type]
