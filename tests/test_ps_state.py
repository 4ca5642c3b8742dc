"""Optimizer state of a parameter-server job: ``opt.state_dict()`` equals one process's,
``opt.load_state_dict()`` resumes exactly, and bad checkpoints are refused.

The pure parts (layouts, cutting and merging pieces, the wire form) run in one process; the
resume tests run real servers and workers (tolerance as in test_ps.py: 1e-5 relative, the
servers average the workers' float32 gradients in arrival order).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ps_harness import run_ps_job
from test_ps import BranchNet, _batch, _optimizer, _wait
from torch import nn
from torch.nn import functional as F

from concord.algorithms.ps_plan import OPTIMIZERS, ParamInfo, Piece, plan_shards
from concord.algorithms.ps_state import (
    COUNT,
    check_state,
    decode_state,
    encode_state,
    fresh_state,
    merge_pieces,
    piece_state,
    state_layout,
)
from concord.comm.wire import WireError
from concord.errors import UsageError
from concord.strategies.ps import ParameterServer
from concord.strategies.ps.client import describe
from concord.strategies.ps.shard import Shard, piece_meta

FIRST, LAST = 3, 6  # the checkpoint is taken after step 3 of 6


class SplitNet(BranchNet):
    """BranchNet (a frozen parameter, a branch used every third step) whose fc2.weight is
    split between two servers, so its state comes back in two pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 40, bias=False)
        self.fc2 = nn.Linear(40, 3)
        self.branch = nn.Linear(40, 3)


# -- pure -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "settings", "layout"),
    [
        ("SGD", {"lr": 0.1}, {}),
        ("SGD", {"lr": 0.1, "momentum": 0.9}, {"momentum_buffer": 1}),
        (
            "Adam",
            {"amsgrad": True},
            {"step": 0, "exp_avg": 1, "exp_avg_sq": 1, "max_exp_avg_sq": 1},
        ),
        ("AdamW", {}, {"step": 0, "exp_avg": 1, "exp_avg_sq": 1}),
        ("RMSprop", {"centered": True}, {"step": 0, "square_avg": 1, "grad_avg": 1}),
        ("Adagrad", {}, {"step": 0, "sum": 1}),
        ("SparseAdam", {}, {"step": COUNT, "exp_avg": 1, "exp_avg_sq": 1}),  # an int step
    ],
)
def test_state_layout_is_what_torch_keeps(name, settings, layout):
    assert state_layout(name, settings) == layout
    param = torch.zeros(5, requires_grad=True)
    opt = OPTIMIZERS[name]([param], **settings)
    param.grad = torch.ones(5).to_sparse() if name == "SparseAdam" else torch.ones(5)
    opt.step()
    check_state("p", opt.state[param], layout, 5)  # torch's own state passes the check


def test_fresh_state_is_a_new_optimizers():
    assert fresh_state("SGD", {"momentum": 0.9}, torch.zeros(3)) == {}
    adagrad = fresh_state("Adagrad", {"initial_accumulator_value": 0.5}, torch.zeros(3))
    assert torch.equal(adagrad["sum"], torch.full((3,), 0.5)) and adagrad["step"].item() == 0


def test_check_state_names_the_problem():
    layout = state_layout("Adam", {})
    good = {"step": torch.tensor(2.0), "exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4)}
    check_state("w", good, layout, 4)
    check_state("w", {}, layout, 4)  # never stepped
    with pytest.raises(ValueError, match=r"w: optimizer state has \['momentum_buffer'\]"):
        check_state("w", {"momentum_buffer": torch.zeros(4)}, layout, 4)
    with pytest.raises(ValueError, match="'exp_avg' has 3 elements, expected 4"):
        check_state("w", good | {"exp_avg": torch.zeros(3)}, layout, 4)
    with pytest.raises(ValueError, match="'step' must be a floating-point tensor"):
        check_state("w", good | {"step": 2}, layout, 4)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data())
def test_pieces_of_a_state_merge_back_to_it(shape, data):
    info = ParamInfo("w", tuple(shape), "float32", 4)
    cuts = sorted(
        data.draw(st.sets(st.integers(1, info.numel - 1), max_size=3)) if info.numel > 1 else []
    )
    bounds = [0, *cuts, info.numel]
    pieces = [Piece("w", a, b, i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    layout = {"step": 0, "exp_avg": 1}
    state = {"step": torch.tensor(7.0), "exp_avg": torch.randn(shape)}
    parts = [(pc, piece_state(state, layout, pc)) for pc in reversed(pieces)]  # any order
    merged = merge_pieces(info, parts)
    assert torch.equal(merged["exp_avg"], state["exp_avg"]) and merged["step"].item() == 7.0
    assert merged["exp_avg"].shape == tuple(shape)
    if len(pieces) > 1:
        with pytest.raises(ValueError, match="do not cover"):
            merge_pieces(info, parts[1:])
        bad = [(pieces[0], {**parts[-1][1], "step": torch.tensor(8.0)}), *parts[:-1]]
        with pytest.raises(ValueError, match="disagree on 'step'"):
            merge_pieces(info, bad)


def test_state_on_the_wire_round_trips_and_bad_entries_are_refused():
    states = {0: {"step": torch.tensor(1.0), "exp_avg": torch.ones(2)}, 2: {"sum": torch.ones(3)}}
    entries, tensors = encode_state(states)
    assert decode_state(entries, tensors, 3) == states
    assert decode_state(None, {}, 3) == {}
    with pytest.raises(ValueError, match="do not match"):
        decode_state(entries, {k: v for k, v in tensors.items() if k != "state0"}, 3)
    with pytest.raises(ValueError, match="bad state entry"):
        decode_state([[5, "sum"]], {"state0": torch.ones(1)}, 3)
    with pytest.raises(ValueError, match="listed twice"):
        decode_state(
            [[0, "sum"], [0, "sum"]], {"state0": torch.ones(1), "state1": torch.ones(1)}, 3
        )


def test_shard_imports_checked_state_and_exports_it():
    config = ParameterServer().config(1)
    metas = [piece_meta(Piece("w", 0, 3, 0), (3,), "float32", 0)]
    shard = Shard(0)
    shard.register_first(
        config, metas, {"names": ["Adam"], "groups": [{"lr": 0.1}]}, {"w[0:3]": torch.ones(3)}
    )
    assert shard.export_state() == {}
    state = {"step": torch.tensor(4.0), "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)}
    shard.import_state({0: state})
    exported = shard.export_state()[0]
    assert exported.keys() == state.keys() and all(
        torch.equal(exported[k], state[k]) for k in state
    )
    with pytest.raises(WireError, match=r"piece w\[0:3\]: optimizer state 'exp_avg' has 2"):
        shard.import_state({0: state | {"exp_avg": torch.ones(2)}})
    assert torch.equal(shard.export_state()[0]["exp_avg"], torch.ones(3))  # unchanged
    shard.apply_grads({"w[0:3]": torch.ones(3)})  # steps on from the imported state
    assert shard.export_state()[0]["step"].item() == 5.0
    shard.import_state({})  # a checkpoint taken before any step: fresh state
    assert shard.export_state() == {}


# -- real jobs ------------------------------------------------------------------------------
def _train_steps(model, opt, rank: int, world: int, steps: range) -> None:
    for step in steps:
        x, y = _batch(step)
        i = torch.arange(rank, 16, world)
        opt.zero_grad()
        F.cross_entropy(model(x[i], step % 3 == 0), y[i]).backward()
        opt.step()


def _resume_worker(opt_name: str, kwargs: dict, checkpoint: dict | None):
    """Without ``checkpoint``: train steps 0-2 and return the checkpoint. With it: start from
    another init, load the model (worker 0 only, after distribute) and the optimizer state on
    every worker, and train steps 3-5."""
    import concord

    ctx = concord.init(timeout=60)
    torch.manual_seed(0 if checkpoint is None else ctx.rank + 11)
    model = SplitNet()
    opt = _optimizer(opt_name, model)
    model, opt = concord.distribute(model, opt, ParameterServer(**kwargs))
    if checkpoint is None:
        _train_steps(model, opt, ctx.rank, ctx.world_size, range(FIRST))
        # (overlap=True: model.state_dict() waits for the parameters still on their way)
        result = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
        result["optimizer"] = opt.state_dict()
        fc1 = opt.state[model.fc1.weight]  # the torch surface, from the servers
        assert torch.equal(fc1[next(iter(fc1))], result["optimizer"]["state"][1][next(iter(fc1))])
        assert not opt.state[model.scale]  # frozen: no state, as in torch
    else:
        if ctx.rank == 0:  # the servers take worker 0's parameters at load_state_dict
            model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        _train_steps(model, opt, ctx.rank, ctx.world_size, range(FIRST, LAST))
        opt.synchronize()  # (overlap=True: the last parameters may still be on their way)
        result = [p.detach().clone() for p in model.parameters()]
    opt.close()
    return result


def _one_process(opt_name: str, steps: range, checkpoint: dict | None = None):
    torch.manual_seed(0)
    model = SplitNet()
    opt = _optimizer(opt_name, model)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
    _train_steps(model, opt, 0, 1, steps)
    return model, opt


def _assert_same_state(got: dict, want: dict) -> None:
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for index, state in want["state"].items():
        assert got["state"][index].keys() == state.keys()
        for key, value in state.items():
            torch.testing.assert_close(got["state"][index][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("opt_name", "servers", "kwargs"),  # saved with S servers, resumed with the other count
    [("adam", (2, 1), {"mode": "sync"}), ("sgd", (1, 2), {"mode": "sync", "overlap": True})],
)
def test_checkpoint_equals_one_process_and_resumes_exactly(opt_name, servers, kwargs):
    first = run_ps_job(_resume_worker, 2, servers[0], args=(opt_name, kwargs, None))
    checkpoint = first.results[0]
    model, opt = _one_process(opt_name, range(FIRST))
    _assert_same_state(checkpoint["optimizer"], opt.state_dict())  # torch's own format
    assert len(checkpoint["optimizer"]["state"]) == 5  # every parameter but the frozen one
    _, infos = describe(model, opt)
    split = [{pc.name for pc in shard} for shard in plan_shards(infos, 2).shards]
    assert split[0] & split[1] == {"fc2.weight"}  # (with 2 servers)
    second = run_ps_job(_resume_worker, 2, servers[1], args=(opt_name, kwargs, checkpoint))
    reference, _ = _one_process(opt_name, range(LAST))
    for params in second.results:  # every worker, from worker 0's model and the state
        for got, want in zip(params, reference.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    resumed, _ = _one_process(opt_name, range(FIRST, LAST), checkpoint)  # it loads into torch
    for got, want in zip(resumed.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _late_loader(checkpoint: dict) -> str:
    """Async: worker 1 steps without loading; worker 0's load then comes too late."""
    import concord

    ctx = concord.init(timeout=60)
    torch.manual_seed(0)
    model = SplitNet()
    opt = _optimizer("sgd", model)
    model, opt = concord.distribute(model, opt, ParameterServer(mode="async"))
    text = ""
    if ctx.rank == 1:
        _train_steps(model, opt, 1, 2, range(1))
    else:
        _wait(opt, lambda s: s["version"] >= 1)
        try:
            opt.load_state_dict(checkpoint)
        except WireError as exc:
            text = str(exc)
        with pytest.raises(ValueError, match="parameter group"):  # torch's own check
            opt.load_state_dict({"state": {}, "param_groups": []})
        bad = {
            **checkpoint,
            "state": {**checkpoint["state"], 1: {"momentum_buffer": torch.ones(2)}},
        }
        with pytest.raises(
            UsageError, match="'fc1.weight': optimizer state 'momentum_buffer' has 2"
        ):
            opt.load_state_dict(bad)
        assert opt.param_groups[0]["lr"] == 0.1 and not opt.optimizer.state  # nothing changed
        opt.synchronize()  # the server is still serving
    opt.close()
    return text


@pytest.mark.timeout(120)
def test_a_checkpoint_loaded_after_training_began_is_refused():
    _, opt = _one_process("sgd", range(2))
    job = run_ps_job(_late_loader, 2, 1, args=(opt.state_dict(),))
    assert "load_state_dict must come before the first step" in job.results[0]
    assert "call it on every worker" in job.results[0]
