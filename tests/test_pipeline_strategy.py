"""The Pipeline strategy in one process: validation, rank layout, splits, optimizer, one stage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from concord.algorithms.multi_optimizer import MultiOptimizer
from concord.comm.runtime import Context
from concord.errors import UsageError
from concord.strategies.pipeline import Pipeline, as_layers, restrict_optimizer


def _ctx(rank: int = 0, world: int = 1) -> Context:
    return Context(
        rank=rank, world_size=world, local_rank=rank, role="worker", servers=0,
        backend="gloo", device=torch.device("cpu"), timeout=10.0,
        master_addr="127.0.0.1", master_port=0,
    )  # fmt: skip


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
        nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def test_validation_names_the_bad_value():
    with pytest.raises(UsageError, match="stages=0"):
        Pipeline(stages=0)
    with pytest.raises(UsageError, match="schedule='pipedream'"):
        Pipeline(schedule="pipedream")
    with pytest.raises(UsageError, match="3 stages need 2 cut"):
        Pipeline(stages=3, split=[2])
    with pytest.raises(UsageError, match="split='layers'"):
        Pipeline(split="layers")
    with pytest.raises(UsageError, match=r"Pipeline\(max_grad_norm\) must be positive"):
        Pipeline(max_grad_norm=0.0)
    with pytest.raises(TypeError, match=r"Pipeline\(max_grad_norm\) must be a number"):
        Pipeline(max_grad_norm="1")
    assert Pipeline(stages=3, split=[3, 5]).split == (3, 5)  # a list becomes a tuple
    hash(Pipeline(stages=3, split=[3, 5]))  # frozen and hashable


def test_world_size_must_be_stages_times_replicas():
    with pytest.raises(UsageError, match=r"stages\(2\) \* replicas\(2\) != WORLD_SIZE\(3\)"):
        Pipeline(stages=2, replicas=2).place(_ctx(0, 3))


def test_rank_layout_and_data_shards():
    strategy = Pipeline(stages=3, replicas=2)
    places = [strategy.place(_ctx(r, 6)) for r in range(6)]
    assert [(p.replica, p.stage) for p in places] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    assert [p.rank_of(2) for p in places] == [2, 2, 2, 5, 5, 5]  # the last stage of my replica
    assert [tuple(strategy.data_shard(_ctx(r, 6))) for r in range(6)] == [(0, 2)] * 3 + [(1, 2)] * 3


def test_splits_of_the_mlp():
    model = _mlp()
    layers = as_layers(model)
    assert Pipeline(stages=3).plan(layers).starts == (0, 3, 5)  # by parameter count
    assert Pipeline(stages=3, split=[2, 6]).plan(layers).starts == (0, 2, 6)
    timed = Pipeline(stages=3, split="time").plan(layers)  # measured here: shape inferred
    assert timed.stages == 3 and timed.starts[1] <= 3  # the big Linear leads on any machine
    assert all(p.grad is None for p in model.parameters())  # measured on copies
    with pytest.raises(UsageError, match="sample_shape"):
        Pipeline(stages=2, split="time").plan(as_layers([nn.Conv2d(1, 2, 3), nn.Flatten()]))
    with pytest.raises(TypeError, match="nn.Sequential"):
        as_layers(nn.Linear(2, 2))


def test_restricted_optimizer_keeps_class_groups_and_state():
    model = _mlp()
    opt = torch.optim.AdamW(
        [{"params": model[1].parameters(), "lr": 0.01}, {"params": model[3].parameters()}],
        lr=0.001, weight_decay=0.5,
    )  # fmt: skip
    model(torch.randn(2, 784)).sum().backward()
    opt.step()
    local = restrict_optimizer(opt, list(model[3].parameters()))
    assert type(local) is torch.optim.AdamW
    assert [g["lr"] for g in local.param_groups] == [0.01, 0.001]
    assert [len(g["params"]) for g in local.param_groups] == [0, 2]
    assert local.param_groups[1]["weight_decay"] == 0.5
    assert local.state[model[3].weight] is opt.state[model[3].weight]
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        restrict_optimizer(object(), [])
    head = torch.optim.AdamW(model[3].parameters())
    both = MultiOptimizer(torch.optim.SGD(model[1].parameters(), lr=0.1), head)
    model(torch.randn(2, 784)).sum().backward()
    both.step()
    local = restrict_optimizer(both, list(model[3].parameters()))
    assert [type(o) for o in local.optimizers] == [torch.optim.SGD, torch.optim.AdamW]
    assert [len(g["params"]) for g in local.param_groups] == [0, 2]
    assert local.state[model[3].weight] is head.state[model[3].weight]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("m", [1, 3, 7, 20])
def test_one_stage_microbatches_equal_the_full_batch(schedule, m):
    """P=1: micro-batching is gradient accumulation, weighted by micro-batch size (7 samples)."""
    ref = _mlp()
    x, y = torch.randn(7, 1, 28, 28), torch.arange(7)
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    model = _mlp()
    strategy = Pipeline(stages=1, microbatches=m, schedule=schedule)
    stage, opt = strategy.distribute(model, torch.optim.SGD(model.parameters(), lr=0.1), _ctx())
    assert [len(g["params"]) for g in opt.param_groups] == [8]
    got = stage.train_batch(x, y, F.cross_entropy)
    assert stage.last_stats.microbatches == min(m, 7)  # never an empty micro-batch
    assert got.item() == pytest.approx(loss.item(), rel=1e-6)
    for (name, p), (ref_name, q) in zip(stage.named_parameters(), ref.named_parameters()):
        assert name == ref_name  # state_dict keys match the unsplit model
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(UsageError, match="train_batch"):
        stage(x)  # training mode with grad enabled: inference only
    with torch.no_grad():
        assert torch.equal(stage(x), ref(x))


def test_an_lr_scheduler_takes_the_stage_optimizer():
    """A stage steps an optimizer restricted to its layers: a scheduler on the returned one
    moves the rate the stage steps with (the optimizer passed in keeps its own)."""
    model = _mlp()
    passed = torch.optim.SGD(model.parameters(), lr=0.1)
    stage, opt = Pipeline(stages=1).distribute(model, passed, _ctx())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = torch.randn(4, 1, 28, 28), torch.arange(4)
    for lr in (0.1, 0.05):
        opt.zero_grad()
        stage.train_batch(x, y, F.cross_entropy)
        before = [p.detach().clone() for p in stage.parameters()]
        grads = [p.grad.clone() for p in stage.parameters()]
        opt.step()
        sched.step()
        for p, b, g in zip(stage.parameters(), before, grads):
            torch.testing.assert_close(p.detach(), b - lr * g)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert passed.param_groups[0]["lr"] == 0.1


def test_a_loss_scaler_is_refused_with_the_bf16_alternative():
    from concord.strategies.pipeline import PipelineOptimizer
    from concord.strategies.pipeline_runtime import StagePlace

    model = nn.Linear(3, 2)
    opt = PipelineOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), StagePlace(0, 0, 1, 1), None, 10.0
    )
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(4, 3)).sum()).backward()
    before = model.weight.detach().clone()
    with pytest.raises(UsageError, match="use torch.autocast with dtype=torch.bfloat16"):
        scaler.step(opt)
    assert torch.equal(model.weight, before)  # refused before anything changed
