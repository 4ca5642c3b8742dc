"""``MultiOptimizer``: torch optimizers over disjoint parameters stepped, zeroed, saved and
loaded as one, exactly as the same optimizers used side by side (equality is exact: the
same kernels run on the same tensors in the same order)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import concord
from concord.algorithms.multi_optimizer import MultiOptimizer, group_owners


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.EmbeddingBag(30, 4, mode="sum", sparse=True), nn.Linear(4, 3))


def _pair(model: nn.Sequential) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    table = torch.optim.SparseAdam(list(model[0].parameters()), lr=0.05)
    dense = torch.optim.Adam(
        [{"params": [model[1].weight]}, {"params": [model[1].bias], "lr": 0.02}], lr=0.01
    )
    return table, dense


def _steps(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        ids, y = (
            torch.randint(0, 30, (8, 3), generator=gen),
            torch.randint(0, 3, (8,), generator=gen),
        )
        opt.zero_grad()
        F.cross_entropy(model(ids), y).backward()
        opt.step()


class _Both:
    """The two optimizers side by side, as a user would step them without MultiOptimizer."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad()

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def test_steps_as_the_optimizers_side_by_side_and_shares_their_groups_and_state():
    alone, together = _model(), _model()
    table, dense = _pair(together)
    multi = MultiOptimizer(table, dense)
    _steps(alone, _Both(*_pair(alone)), range(4))
    _steps(together, multi, range(4))
    for got, want in zip(together.parameters(), alone.parameters()):
        assert torch.equal(got, want)
    assert all(a is b for a, b in zip(multi.param_groups, table.param_groups + dense.param_groups))
    assert group_owners(multi) == [table, dense, dense] and group_owners(dense) == [dense, dense]
    assert multi.state.keys() == table.state.keys() | dense.state.keys()
    assert multi.state[together[1].bias] is dense.state[together[1].bias]
    assert table.state_dict()["state"][0]["step"] == 4  # each still saves its own
    assert multi.state[together[0].weight]["step"] == 4  # SparseAdam counts in an int
    assert together[1].weight.grad is not None
    multi.zero_grad()
    assert all(p.grad is None for p in together.parameters())


def test_state_dict_is_torchs_format_over_all_groups_and_resumes_exactly():
    straight, resumed = _model(), _model()
    opt = MultiOptimizer(*_pair(straight))
    _steps(straight, opt, range(3))
    saved = copy.deepcopy(opt.state_dict())  # (as torch.save would: torch aliases tensors)
    assert [g["params"] for g in saved["param_groups"]] == [[0], [1], [2]]
    assert saved["state"][0]["step"] == 3 and saved["state"][1]["step"].item() == 3.0
    resumed.load_state_dict(straight.state_dict())
    again = MultiOptimizer(*_pair(resumed))
    again.load_state_dict(saved)
    _steps(straight, opt, range(3, 6))
    _steps(resumed, again, range(3, 6))
    for got, want in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(got, want)


def test_a_bad_state_dict_changes_nothing():
    model = _model()
    opt = MultiOptimizer(*_pair(model))
    _steps(model, opt, range(2))
    saved = opt.state_dict()
    before = {
        p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for p, s in opt.state.items()
    }
    with pytest.raises(ValueError, match="2 param groups, this MultiOptimizer 3"):
        opt.load_state_dict({"state": {}, "param_groups": saved["param_groups"][:2]})
    wrong = copy.deepcopy(saved)  # the table's share loads, then the head's fails
    wrong["state"][0]["step"] = 99
    wrong["param_groups"][2]["params"] = [2, 3]
    with pytest.raises(ValueError):  # torch's own check, on the second optimizer's share
        opt.load_state_dict(wrong)
    stray = {"state": {**saved["state"], 7: {}}, "param_groups": saved["param_groups"]}
    with pytest.raises(ValueError, match=r"parameters \[7\] in no group"):
        opt.load_state_dict(stray)
    assert opt.state[model[0].weight]["step"] == 2  # the table's share was taken back
    assert opt.state.keys() == before.keys()
    for param, state in before.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(opt.state[param][key]), torch.as_tensor(value))


def test_lr_schedulers_work_on_one_optimizer_or_the_whole():
    model = _model()
    table, dense = _pair(model)
    multi = MultiOptimizer(table, dense)
    one = torch.optim.lr_scheduler.StepLR(table, step_size=1, gamma=0.5)
    _steps(model, multi, range(1))
    one.step()
    assert multi.param_groups[0]["lr"] == 0.025
    whole = torch.optim.lr_scheduler.LambdaLR(multi, lambda epoch: 0.1)
    assert [g["lr"] for g in multi.param_groups] == pytest.approx(
        [0.005, 0.001, 0.002]
    )  # initial_lr * 0.1
    _steps(model, multi, range(1, 2))
    whole.step()
    assert dense.param_groups[1]["lr"] == pytest.approx(0.002)


def test_refuses_shared_parameters_late_groups_and_non_optimizers():
    model = _model()
    table, dense = _pair(model)
    twice = torch.optim.SGD(model[1].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"in optimizers 1 \(Adam\) and 2 \(SGD\)"):
        MultiOptimizer(table, dense, twice)
    with pytest.raises(TypeError, match="expected torch.optim optimizers, got Linear"):
        MultiOptimizer(table, model[1])
    with pytest.raises(ValueError, match="at least one"):
        MultiOptimizer()
    nested = MultiOptimizer(MultiOptimizer(table), dense)
    assert nested.optimizers == [table, dense]
    with pytest.raises(TypeError, match="add the group to one of the optimizers"):
        nested.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})


def test_distribute_takes_a_list_of_optimizers():
    """One process (AllReduce over world 1): the list becomes one MultiOptimizer."""
    alone, model = _model(), _model()
    wrapped, opt = concord.distribute(model, list(_pair(model)), concord.AllReduce())
    assert isinstance(opt.optimizer, MultiOptimizer)
    _steps(wrapped, opt, range(3))
    _steps(alone, _Both(*_pair(alone)), range(3))
    for got, want in zip(model.parameters(), alone.parameters()):
        assert torch.equal(got, want)
    concord.shutdown()
