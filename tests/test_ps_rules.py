"""Parameter-server cores in one process: shard planning, optimizer specs, sync rounds, the
staleness clock, the shard's checks, the strategy's validation, and the server loop's
decisions driven through a fake channel (deterministic: no sockets, no timing)."""

from __future__ import annotations

import copy
import time
import weakref
from collections import Counter
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from concord.algorithms.multi_optimizer import MultiOptimizer
from concord.algorithms.ps_plan import (
    OptimizerSpec,
    ParamInfo,
    Piece,
    hyperparameters,
    pack_pieces,
    plan_shards,
    spec_from_optimizer,
)
from concord.algorithms.ps_rules import StalenessClock, SyncAggregator, clip_coefficient
from concord.algorithms.row_grads import (
    ROWS_SUFFIX,
    RowGrad,
    gather_rows,
    rows_numel,
    scatter_rows,
)
from concord.comm.parts import split_message
from concord.comm.server_channel import LaneBytes, Request
from concord.comm.wire import Message, WireError
from concord.errors import PeerTimeoutError, UsageError
from concord.strategies.ps import ParameterServer
from concord.strategies.ps.norms import NormExchange
from concord.strategies.ps.shard import Shard, piece_meta, step_optimizer
from concord.strategies.ps.shard_server import ShardServer


def _info(name: str, numel: int, group: int = 0) -> ParamInfo:
    return ParamInfo(name, (numel,), "float32", 4, group)


# -- shard planning -------------------------------------------------------------------------
def test_plan_splits_a_large_tensor_at_the_byte_midpoint():
    # a: 400 B, b: 40 B, c: 1200 B; total 1640, target cut at 820 B = c element (820-440)/4
    plan = plan_shards([_info("a", 100), _info("b", 10), _info("c", 300)], 2)
    assert plan.shards == (
        (Piece("a", 0, 100, 0), Piece("b", 0, 10, 0), Piece("c", 0, 95, 0)),
        (Piece("c", 95, 300, 1),),
    )
    assert plan.nbytes([_info("a", 100), _info("b", 10), _info("c", 300)]) == [820, 820]


def test_plan_moves_a_cut_in_a_small_tensor_to_its_nearest_edge():
    # a: 400 B, b: 60 B (< a quarter of the 440 B fair share), c: 360 B; cut at 410 -> 400
    params = [_info("a", 100), _info("b", 15), _info("c", 90)]
    plan = plan_shards(params, 2)
    assert [[pc.key for pc in s] for s in plan.shards] == [["a[0:100]"], ["b[0:15]", "c[0:90]"]]


def test_plan_cuts_pieces_to_at_most_piece_bytes():
    plan = plan_shards([_info("a", 10), _info("b", 2)], 1, piece_bytes=16)
    assert [pc.key for pc in plan.shards[0]] == ["a[0:4]", "a[4:8]", "a[8:10]", "b[0:2]"]
    # a table that travels as rows stays one piece per server (still split between servers)
    plan = plan_shards([_info("a", 10), _info("b", 2)], 1, piece_bytes=16, whole={"a"})
    assert [pc.key for pc in plan.shards[0]] == ["a[0:10]", "b[0:2]"]
    plan = plan_shards([_info("a", 10), _info("b", 2)], 2, piece_bytes=16, whole={"a"})
    assert [[pc.key for pc in s] for s in plan.shards] == [["a[0:6]"], ["a[6:10]", "b[0:2]"]]


def test_plan_splits_a_table_stepped_by_rows_at_a_row_boundary():
    """A sparse table stepped by rows is cut between servers at a row boundary (each piece
    whole rows), other tensors at an element boundary; the shards stay balanced."""
    table = [ParamInfo("t", (50, 6), "float32", 4), _info("b", 30)]  # 1200 + 120 B
    by_element = plan_shards(table, 2)  # cut at 660 B: element 165, mid-row 27
    assert [pc.key for pc in by_element.shards[0]] == ["t[0:165]"]
    by_row = plan_shards(table, 2, whole=frozenset({"t"}))  # row 27.5 -> 28: element 168
    assert [[pc.key for pc in s] for s in by_row.shards] == [
        ["t[0:168]"],
        ["t[168:300]", "b[0:30]"],
    ]
    assert by_row.nbytes(table) == [672, 648]
    wide = [ParamInfo("w", (3, 400), "float32", 4)]  # rows of 1.6 kB >= split_at (600 B):
    assert plan_shards(wide, 2, whole=frozenset({"w"})).shards[0] == (Piece("w", 0, 600, 0),)


def test_packs_are_runs_of_one_dtype_within_the_byte_limit():
    pieces = [("a", "float32", 4, 3), ("b", "float32", 4, 1), ("c", "float32", 4, 2)]
    pieces += [("d", "int64", 8, 2), ("e", "int64", 8, 0), ("f", "float32", 4, 5)]
    packs = pack_pieces(pieces, piece_bytes=16)
    assert [(p.key, p.dtype, p.members) for p in packs] == [
        ("pack0", "float32", (("a", 0, 3), ("b", 3, 1))),  # c would make 24 B > 16
        ("pack1", "float32", (("c", 0, 2),)),
        ("pack2", "int64", (("d", 0, 2), ("e", 2, 0))),
        ("pack3", "float32", (("f", 0, 5),)),  # a piece over the limit is a pack of its own
    ]
    assert [p.numel for p in packs] == [4, 2, 2, 5] and packs[0].sizes == [3, 1]
    flat = torch.arange(4.0)  # a pack's values: each member's part is a view of them
    a, b = packs[0].views(flat)
    assert a.tolist() == [0, 1, 2] and b.tolist() == [3] and b.data_ptr() == flat[3:].data_ptr()
    (only,) = packs[1].views(flat[:2])  # one member: the values themselves
    assert only.shape == (2,) and only.data_ptr() == flat.data_ptr()
    assert pack_pieces([]) == ()
    alone = pack_pieces(pieces[:3] + pieces[:2], alone=frozenset({"b"}))  # a sparse table
    assert [p.members for p in alone] == [
        (("a", 0, 3),),
        (("b", 0, 1),),
        (("c", 0, 2), ("a", 2, 3)),
        (("b", 0, 1),),
    ]


def test_plan_with_one_server_and_more_servers_than_tensors():
    params = [_info("a", 3), _info("b", 5)]
    assert plan_shards(params, 1).shards == ((Piece("a", 0, 3, 0), Piece("b", 0, 5, 0)),)
    shards = plan_shards(params, 4).shards
    assert sum(pc.numel for s in shards for pc in s) == 8  # every element somewhere
    with pytest.raises(ValueError, match="need servers >= 1"):
        plan_shards(params, 0)
    with pytest.raises(ValueError, match="unique"):
        plan_shards([_info("a", 1), _info("a", 2)], 1)


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=12),
    itemsizes=st.lists(st.sampled_from([1, 2, 4, 8]), min_size=12, max_size=12),
    servers=st.integers(1, 6),
    piece_bytes=st.sampled_from([1, 7, 1000, 1 << 22]),
)
def test_plan_covers_every_element_once_and_balances_bytes(sizes, itemsizes, servers, piece_bytes):
    params = [ParamInfo(f"p{i}", (n,), "float32", itemsizes[i], 0) for i, n in enumerate(sizes)]
    plan = plan_shards(params, servers, piece_bytes=piece_bytes)
    for p in params:
        pieces = [pc for s in plan.shards for pc in s if pc.name == p.name]
        assert pieces[0].start == 0 and pieces[-1].stop == p.numel
        assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:]))
        assert all(pc.numel * p.itemsize <= max(piece_bytes, p.itemsize) for pc in pieces)
    fair = sum(p.nbytes for p in params) / servers
    for got in plan.nbytes(params):
        assert abs(got - fair) <= fair / 4 + 16  # snapped cuts, element rounding


# -- optimizer spec -------------------------------------------------------------------------
def test_spec_round_trips_settings_per_group():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD(
        [{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1, momentum=0.9, nesterov=True
    )
    spec = OptimizerSpec.from_json(spec_from_optimizer(opt).to_json())
    assert spec.names == ("SGD", "SGD")
    assert [g["lr"] for g in spec.groups] == [0.1, 0.5]
    assert spec.groups[0]["nesterov"] is True and spec.groups[1]["momentum"] == 0.9
    built = spec.build([[torch.zeros(2)], [torch.zeros(3)]])
    assert [g["lr"] for g in built.optimizer.param_groups] == [0.1, 0.5]
    opt.param_groups[0]["lr"] = 0.01
    assert hyperparameters(opt)[0]["lr"] == 0.01


def test_split_tensor_updates_exactly_as_whole():
    """Element-wise optimizers: Adam on two pieces equals Adam on the whole tensor."""
    whole = torch.nn.Parameter(torch.linspace(-1, 1, 10))
    opt = torch.optim.Adam([whole], lr=0.1, betas=(0.8, 0.9), weight_decay=0.1)
    spec = spec_from_optimizer(opt)
    pieces = [whole.detach()[:4].clone(), whole.detach()[4:].clone()]
    split = spec.build([pieces]).optimizer
    for step in range(3):
        grad = torch.sin(torch.arange(10.0) + step)
        whole.grad = grad.clone()
        opt.step()
        pieces[0].grad, pieces[1].grad = grad[:4].clone(), grad[4:].clone()
        split.step()
    assert torch.equal(torch.cat(pieces), whole.detach())
    assert split.param_groups[0]["betas"] == (0.8, 0.9)


def test_shard_steps_dense_float_groups_with_the_fused_kernel():
    """A shard builds its optimizer with torch's fused kernel for the groups that have only
    dense float32/float64 pieces (a sparse table's group, or half precision, keeps the
    default loop); the result equals the default to float rounding. RMSprop has no kernel."""
    config = ParameterServer().config(1)
    metas = [
        piece_meta(Piece("w", 0, 6, 0), (6,), "float32", 0),
        piece_meta(Piece("e", 0, 8, 0), (4, 2), "float32", 1, sparse=True),
        piece_meta(Piece("h", 0, 3, 0), (3,), "float16", 2),
    ]
    initial = {"w[0:6]": torch.linspace(-1, 1, 6), "e[0:8]": torch.zeros(8)}
    initial["h[0:3]"] = torch.zeros(3, dtype=torch.float16)
    for name, fused in [("Adam", [True, False, False]), ("RMSprop", [None, None, None])]:
        shard = Shard(0)
        spec = {"names": [name] * 3, "groups": [{"lr": 0.1}] * 3}
        shard.register_first(config, metas, spec, initial)
        assert [g.get("fused") for g in shard.optimizer.param_groups] == fused
    reference = torch.nn.Parameter(torch.linspace(-1, 1, 6))
    default = torch.optim.Adam([reference], lr=0.1)
    adam = Shard(0)
    spec = {"names": ["Adam"], "groups": [{"lr": 0.1}]}
    adam.register_first(config, metas[:1], spec, {"w[0:6]": initial["w[0:6]"]})
    for step in range(3):
        reference.grad = torch.sin(torch.arange(6.0) + step)
        default.step()
        adam.apply_grads({"w[0:6]": reference.grad.clone()})
    torch.testing.assert_close(adam.values["w[0:6]"], reference.detach(), rtol=1e-6, atol=0)


def test_a_shard_steps_past_torchs_profiling_wrapper_unless_a_step_hook_is_set():
    """``step_optimizer`` calls the optimizer's own step (not torch's ``record_function``
    wrapper) and lands on the same values as ``step()``; with a hook on this optimizer or on
    every optimizer it takes the plain ``step()``, so the hook runs."""
    torch.manual_seed(0)
    ranges = []
    for hooked in (None, "own", "global"):
        a, b = (torch.nn.Parameter(torch.linspace(-1, 1, 7)) for _ in range(2))
        plain = torch.optim.SGD([a], lr=0.1, momentum=0.9, weight_decay=0.01)
        bare = torch.optim.SGD([b], lr=0.1, momentum=0.9, weight_decay=0.01)
        calls: list[str] = []
        handle = None
        if hooked == "own":
            handle = bare.register_step_post_hook(lambda *_, c=calls: c.append("own"))
        elif hooked == "global":
            from torch.optim.optimizer import register_optimizer_step_pre_hook

            handle = register_optimizer_step_pre_hook(lambda *_, c=calls: c.append("global"))
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for step in range(3):
                    a.grad = b.grad = torch.cos(torch.arange(7.0) * (step + 1))
                    plain.step()
                    step_optimizer(bare)
        finally:
            if handle is not None:
                handle.remove()
        assert torch.equal(a.detach(), b.detach())
        assert calls == ([hooked] * (3 if hooked == "own" else 6) if hooked else [])
        ranges.append(sum(e.name == "Optimizer.step#SGD.step" for e in prof.events()))
    assert ranges == [3, 6, 6]  # only the plain steps open torch's profiler range


def test_spec_refuses_what_is_not_allow_listed():
    class MySGD(torch.optim.SGD):
        pass

    p = [torch.nn.Parameter(torch.ones(1))]
    with pytest.raises(TypeError, match="must be one of torch.optim.SGD.*got .*MySGD"):
        spec_from_optimizer(MySGD(p, lr=0.1))
    with pytest.raises(TypeError, match="LBFGS"):
        spec_from_optimizer(torch.optim.LBFGS(p))
    with pytest.raises(ValueError, match="'Evil' is not allowed"):
        OptimizerSpec.from_json({"names": ["Evil"], "groups": [{}]})
    with pytest.raises(ValueError, match="SGD has no setting 'params'"):
        OptimizerSpec.from_json({"names": ["SGD"], "groups": [{"params": 1}]})
    with pytest.raises(TypeError, match="lr='os.system' must be a number"):
        OptimizerSpec.from_json({"names": ["SGD"], "groups": [{"lr": "os.system"}]})
    with pytest.raises(ValueError, match="not finite"):
        OptimizerSpec.from_json({"names": ["SGD"], "groups": [{"lr": float("nan")}]})


# -- sync rounds ----------------------------------------------------------------------------
def test_sync_round_averages_and_treats_a_missing_gradient_as_zero():
    agg = SyncAggregator(workers=2)
    assert agg.push(0, 0, {"a": torch.tensor([1.0, 2.0])}) == "counted"
    assert agg.push(1, 0, {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([2.0])}) == "complete"
    result = agg.finish()
    assert result.contributors == (0, 1) and agg.version == 1
    assert torch.equal(result.grads["a"], torch.tensor([2.0, 3.0]))
    assert torch.equal(result.grads["b"], torch.tensor([1.0]))  # (0 + 2) / 2
    assert "c" not in result.grads  # no gradient anywhere: the optimizer skips it


def test_sync_round_skips_only_the_pieces_absent_from_every_push():
    agg = SyncAggregator(workers=3)
    agg.push(0, 0, {"pack0": torch.tensor([2.0, 0.0, 0.0])}, absent=frozenset({"b", "c"}))
    agg.push(1, 0, {"pack0": torch.tensor([4.0, 3.0, 0.0])}, absent=frozenset({"c"}))
    agg.push(2, 0, {"pack0": torch.tensor([0.0, 0.0, 0.0])}, absent=frozenset({"a", "b", "c"}))
    result = agg.finish()
    assert result.absent == {"c"} and torch.equal(result.grads["pack0"], torch.tensor([2.0, 1, 0]))
    agg.push(0, 1, {"pack0": torch.ones(3)})  # a new round forgets the last one's absences
    assert agg.finish().absent == frozenset()


def test_sync_round_reads_gradients_only_while_pushed_and_reuses_its_buffers():
    agg = SyncAggregator(workers=2)
    received = torch.tensor([1.0, 2.0])  # e.g. a view of a lane: reused after the push
    agg.push(0, 0, {"a": received})
    received.fill_(100.0)
    agg.push(1, 0, {"a": torch.tensor([3.0, 4.0])})
    first = agg.finish().grads["a"]
    assert torch.equal(first, torch.tensor([2.0, 3.0])) and torch.equal(
        received, torch.full((2,), 100.0)
    )
    agg.push(0, 1, {"a": torch.tensor([5.0, 5.0])})
    agg.push(1, 1, {"a": torch.tensor([1.0, 1.0])})
    second = agg.finish().grads["a"]
    assert torch.equal(second, torch.tensor([3.0, 3.0])) and second.data_ptr() == first.data_ptr()


@pytest.mark.parametrize("workers, backup", [(1, 0), (3, 2)])
def test_a_push_that_alone_fills_its_round_is_used_as_it_came(workers, backup):
    agg = SyncAggregator(workers=workers, backup_workers=backup)
    received = torch.tensor([1.0, 2.0])  # no copy: finish() comes before the buffer is reused
    assert agg.push(0, 0, {"a": received}) == "complete"
    result = agg.finish()
    assert result.grads["a"] is received and torch.equal(received, torch.tensor([1.0, 2.0]))
    if workers > 1:  # a round that more than one push fills still sums into its own buffer
        agg = SyncAggregator(workers=workers, backup_workers=backup - 1)
        agg.push(0, 0, {"a": received})
        received.fill_(7.0)
        agg.push(1, 0, {"a": torch.tensor([3.0, 4.0])})
        assert torch.equal(agg.finish().grads["a"], torch.tensor([2.0, 3.0]))


def test_sync_round_with_a_backup_worker_drops_the_late_one():
    agg = SyncAggregator(workers=3, backup_workers=1)
    agg.push(2, 0, {"a": torch.ones(1)})
    assert agg.push(0, 0, {"a": torch.full((1,), 3.0)}) == "complete"
    assert torch.equal(agg.finish().grads["a"], torch.tensor([2.0]))
    assert agg.push(1, 0, {"a": torch.ones(1)}) == "late"
    assert agg.dropped == [(1, 0)]
    with pytest.raises(ValueError, match="worker 1 pushed a gradient for step 3"):
        agg.push(1, 3, {})
    agg.push(1, 1, {})
    with pytest.raises(ValueError, match="pushed twice"):
        agg.push(1, 1, {})
    with pytest.raises(ValueError, match="backup_workers"):
        SyncAggregator(workers=2, backup_workers=2)


@settings(max_examples=150, deadline=None)
@given(
    rows_in=st.integers(1, 9),
    width=st.integers(1, 5),
    cut=st.tuples(st.integers(0, 45), st.integers(0, 45)),
    chosen=st.sets(st.integers(0, 8)),
)
def test_row_grad_adds_exactly_the_piece_s_elements_of_its_rows(rows_in, width, cut, chosen):
    """A piece may start and end mid-row: its part of the rows, nothing else, is added."""
    numel = rows_in * width
    start, stop = sorted(min(c, numel) for c in cut)
    table = torch.randn(rows_in, width, dtype=torch.float64)
    first = start // width
    end = (stop - 1) // width + 1 if stop > start else 0
    rows = torch.tensor(sorted(r for r in chosen if first <= r < end), dtype=torch.long)
    dense = torch.zeros(rows_in, width, dtype=torch.float64)
    dense[rows] = table[rows]
    grad = RowGrad.checked(rows, table[rows].reshape(-1), width, start, stop - start)
    target = torch.ones(stop - start, dtype=torch.float64)
    grad.add_to(target)
    torch.testing.assert_close(target, 1 + dense.reshape(-1)[start:stop], rtol=0, atol=1e-12)
    torch.testing.assert_close(grad.dense(target), dense.reshape(-1)[start:stop])
    assert torch.equal(grad.sparse().to_dense(), dense.reshape(-1)[start:stop])
    if start % width == 0 and stop % width == 0:  # whole rows: one index per row
        by_row = grad.sparse_rows()
        assert by_row.shape == ((stop - start) // width, width) and by_row.is_coalesced()
        assert torch.equal(by_row.to_dense().reshape(-1), dense.reshape(-1)[start:stop])
    else:
        with pytest.raises(ValueError, match="is not whole rows"):
            grad.sparse_rows()
    # a reply's rows: the piece's elements of them, in order, and back
    held = [i - start for r in rows.tolist() for i in range(r * width, (r + 1) * width)]
    held = torch.tensor([i for i in held if 0 <= i < stop - start], dtype=torch.long)
    piece = table.reshape(-1)[start:stop]
    values = gather_rows(piece, rows, width, start)
    assert rows_numel(rows, width, start, stop - start) == len(held)
    assert torch.equal(values, piece[held])
    back = torch.zeros_like(piece)
    scatter_rows(back, rows, width, start, values)
    assert torch.equal(back, dense.reshape(-1)[start:stop])
    with pytest.raises(ValueError, match="values in this piece"):
        scatter_rows(back, rows, width, start, torch.ones(len(held) + 1, dtype=torch.float64))


def test_row_grad_refuses_bad_rows():
    values = torch.ones(2, 4)
    bad = [
        (torch.tensor([1, 2], dtype=torch.int32), values, "1-D int64"),
        (torch.tensor([[1, 2]]), values, "1-D int64"),
        (torch.tensor([1, 2]), torch.ones(7), "need 8 values, got 7"),
        (torch.tensor([2, 1]), values, "sorted and unique"),
        (torch.tensor([1, 1]), values, "sorted and unique"),
        (torch.tensor([0, 2]), values, r"in \[1, 4\)"),  # piece [5, 13): rows 1..3
        (torch.tensor([1, 4]), values, r"in \[1, 4\)"),
        (torch.tensor([-1, 2]), values, r"in \[1, 4\)"),
    ]
    for rows, vals, match in bad:
        with pytest.raises(ValueError, match=match):
            RowGrad.checked(rows, vals, 4, 5, 8)
    with pytest.raises(ValueError, match="no rows"):
        RowGrad.checked(torch.tensor([0]), torch.ones(0), 0, 0, 0)


def test_sync_round_adds_rows_and_dense_pushes_alike():
    """One worker pushes rows (a sparse gradient), the other the same piece dense."""
    agg = SyncAggregator(workers=2)
    rows = RowGrad.checked(torch.tensor([0, 2]), torch.tensor([1.0, 2, 3, 4]), 2, 1, 4)
    assert agg.push(0, 0, {"p": rows}) == "counted"  # piece = elements [1, 5) of a 3x2 table
    agg.push(1, 0, {"p": torch.tensor([2.0, 2, 2, 2])})
    assert torch.equal(agg.finish().grads["p"], torch.tensor([2.0, 1, 1, 2.5]))
    agg.push(0, 1, {"p": torch.full((4,), 4.0)})  # buffers are reused; rows start from zero
    agg.push(1, 1, {"p": rows})
    assert torch.equal(agg.finish().grads["p"], torch.tensor([3.0, 2, 2, 3.5]))
    other = RowGrad.checked(torch.tensor([1, 2]), torch.tensor([5.0, 6, 7, 8]), 2, 1, 4)
    agg.push(0, 2, {"p": rows})  # rows from everyone: the average is rows, each row once
    agg.push(1, 2, {"p": other})
    result = agg.finish()
    merged = result.grads["p"]
    assert torch.equal(merged.rows, torch.tensor([0, 1, 2])) and result.rows["p"] is merged.rows
    assert torch.equal(merged.values, torch.tensor([[0.5, 1], [2.5, 3], [5, 6]]))
    assert torch.equal(merged.sparse().to_dense(), torch.tensor([1.0, 2.5, 3, 5]))
    assert torch.equal(merged.dense(torch.empty(4)), torch.tensor([1.0, 2.5, 3, 5]))


def test_removing_a_worker_can_complete_the_round():
    agg = SyncAggregator(workers=2)
    agg.push(0, 0, {"a": torch.ones(1)})
    assert agg.missing() == [1]
    assert agg.remove(1) is True and agg.needed == 1


# -- staleness clock ------------------------------------------------------------------------
def test_staleness_clock_bounds_the_lead():
    clock = StalenessClock(range(2), max_staleness=1)
    clock.tick(0)
    assert clock.lead(0) == 1 and clock.may_proceed(0)
    clock.tick(0)
    assert clock.lead(0) == 2 and not clock.may_proceed(0)
    clock.tick(1)
    assert clock.may_proceed(0) and clock.slowest() == (1, 1)
    clock.tick(0)
    clock.tick(0)
    assert not clock.may_proceed(0)
    clock.remove(1)  # a finished or lost worker no longer holds the others back
    assert clock.may_proceed(0)


def test_staleness_zero_is_lockstep_and_none_never_blocks():
    lock = StalenessClock(range(3), max_staleness=0)
    lock.tick(0)
    lock.tick(1)
    assert not lock.may_proceed(0) and not lock.may_proceed(1)
    lock.tick(2)
    assert all(lock.may_proceed(w) for w in range(3))
    free = StalenessClock(range(2), max_staleness=None)
    for _ in range(50):
        free.tick(0)
    assert free.lead(0) == 50 and free.may_proceed(0)
    with pytest.raises(ValueError, match="max_staleness"):
        StalenessClock(range(2), -1)


# -- shard checks ---------------------------------------------------------------------------
def _metas(shape=(2,), name="w", dtype="float32") -> list[dict]:
    numel = int(torch.tensor(shape).prod())
    return [piece_meta(Piece(name, 0, numel, 0), shape, dtype, 0)]


def _sgd_spec() -> dict:
    return {"names": ["SGD"], "groups": [{"lr": 0.5}]}


def test_shard_checks_every_worker_against_worker_0():
    config = ParameterServer().config(2)
    shard = Shard(0)
    shard.register_first(config, _metas(), _sgd_spec(), {"w[0:2]": torch.ones(2)})
    shard.check_worker(1, config, _metas())  # identical: fine
    with pytest.raises(WireError, match=r"parameter 'w': worker 1 has dtype float32 shape \[3\]"):
        shard.check_worker(1, config, _metas(shape=(3,)))
    with pytest.raises(WireError, match="worker 1 has parameter 'v' but worker 0 registered 'w'"):
        shard.check_worker(1, config, _metas(name="v"))
    with pytest.raises(WireError, match=r"settings \['mode'\]"):
        shard.check_worker(1, ParameterServer(mode="async").config(2), _metas())
    with pytest.raises(WireError) as err:
        shard.check_tensors({"w[0:2]": torch.ones(2, dtype=torch.float64)}, "gradient", _metas())
    assert err.value.kind == "dtype"
    with pytest.raises(WireError, match="has 3 elements, expected 2"):
        shard.check_tensors({"w[0:2]": torch.ones(3)}, "gradient", _metas())
    with pytest.raises(WireError, match="'x' is not a piece"):
        shard.check_tensors({"x": torch.ones(2)}, "gradient", _metas())
    shard.apply_grads({"w[0:2]": torch.ones(2)})
    assert torch.equal(shard.values["w[0:2]"], torch.full((2,), 0.5)) and shard.version == 1
    shard.set_hyperparameters([{"lr": 0.25}])
    shard.apply_grads({})  # no gradient: skipped, like grad None in one process
    assert torch.equal(shard.values["w[0:2]"], torch.full((2,), 0.5)) and shard.version == 2


def test_shard_keeps_pieces_as_views_of_packs_and_checks_pushed_packs():
    config = ParameterServer().config(1)
    metas = _metas(shape=(2,), name="w") + _metas(shape=(3,), name="v")
    metas += _metas(shape=(1,), name="n", dtype="float64")
    initial = {"w[0:2]": torch.ones(2), "v[0:3]": torch.full((3,), 2.0)}
    initial["n[0:1]"] = torch.tensor([7.0], dtype=torch.float64)
    shard = Shard(0)
    spec = {"names": ["SGD"], "groups": [{"lr": 0.5, "momentum": 0.9}]}
    shard.register_first(config, metas, spec, initial)
    assert [(p.key, p.dtype, p.numel) for p in shard.packs] == [
        ("pack0", "float32", 5),
        ("pack1", "float64", 1),
    ]
    assert torch.equal(shard.snapshot(copy=True)["pack0"], torch.tensor([1.0, 1, 2, 2, 2]))
    assert shard.pieces_in(["pack1", "pack0"]) == ["w[0:2]", "v[0:3]", "n[0:1]"]
    good = {"pack0": torch.ones(5), "pack1": torch.ones(1, dtype=torch.float64)}
    shard.check_packs(good, "gradient")
    bad = [
        ({"pack0": torch.ones(5)}, "shape", "must carry packs"),
        ({**good, "pack1": torch.zeros(1)}, "dtype", "'pack1' is torch.float32"),
        ({**good, "pack0": torch.ones(4)}, "shape", "has 4 elements, expected 5"),
    ]
    for tensors, kind, match in bad:
        with pytest.raises(WireError, match=match) as err:
            shard.check_packs(tensors, "gradient")
        assert err.value.kind == kind
    for indices in ([3], [-1], "0", [True], [0.0]):
        with pytest.raises(WireError, match="absent pieces"):
            shard.absent_pieces(indices)
    absent = shard.absent_pieces([1])
    assert absent == {"v[0:3]"} and shard.absent_pieces(None) == frozenset()
    grads = shard.piece_grads({**good, "pack0": torch.tensor([1.0, 1, 0, 0, 0])}, absent)
    assert list(grads) == ["w[0:2]", "n[0:1]"]
    shard.apply_grads(grads)  # "v" has no gradient: no momentum step either
    after = shard.snapshot(copy=False)["pack0"]
    assert torch.equal(after, torch.tensor([0.5, 0.5, 2, 2, 2]))
    assert shard.values["n[0:1]"].item() == 6.5
    assert after.data_ptr() == shard.values["w[0:2]"].data_ptr()  # pieces view their pack
    with pytest.raises(WireError, match="described twice"):
        Shard(0).register_first(config, metas + metas[:1], spec, initial)


def test_shard_takes_a_sparse_gradient_s_rows_for_a_one_piece_pack():
    """Piece ``e[3:13]`` of a 5x4 table (mid-row at both ends) travels alone in its pack;
    ``w`` and ``v`` share one and must come dense."""
    config = ParameterServer().config(1)
    metas = [piece_meta(Piece("e", 3, 13, 0), (5, 4), "float64", 0, sparse=True)]
    metas += _metas(shape=(2,), name="w") + _metas(shape=(3,), name="v")
    initial = {"e[3:13]": torch.zeros(10, dtype=torch.float64)}
    initial |= {"w[0:2]": torch.ones(2), "v[0:3]": torch.ones(3)}
    shard = Shard(0)
    shard.register_first(config, metas, {"names": ["SGD"], "groups": [{"lr": 1.0}]}, initial)
    assert shard.row_packs == {"pack0": (4, 3, 10)}
    dense = {"pack1": torch.ones(5)}
    rows = {
        "pack0": torch.arange(8.0, dtype=torch.float64),
        "pack0" + ROWS_SUFFIX: torch.tensor([0, 3]),
    }
    packs = shard.check_push({**dense, **rows}, "gradient")
    assert isinstance(packs["pack0"], RowGrad) and packs["pack1"] is dense["pack1"]
    grads = shard.piece_grads(packs)  # row 0's element 3, row 3's element 0
    want = torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 0, 0, 4], dtype=torch.float64)
    assert grads["e[3:13]"].is_sparse  # plain SGD: a step touches only these two elements
    assert torch.equal(grads["e[3:13]"].to_dense(), want)
    shard.apply_grads(grads)
    assert torch.equal(shard.values["e[3:13]"], -want)
    shard.set_hyperparameters([{"lr": 1.0, "momentum": 0.5}])  # every row moves: dense
    assert torch.equal(shard.piece_grads(packs)["e[3:13]"], want)
    bad = [
        (
            {**dense, "pack1" + ROWS_SUFFIX: torch.tensor([0]), **rows},
            "shape",
            "not a sparse table's piece",
        ),
        (
            {**dense, "pack7" + ROWS_SUFFIX: torch.tensor([0]), **rows},
            "shape",
            "must carry packs",
        ),
        ({**dense, "pack0" + ROWS_SUFFIX: torch.tensor([0])}, "shape", "must carry packs"),
        ({**dense, **rows, "pack0": torch.ones(8)}, "dtype", "is torch.float32"),
        (
            {**dense, **rows, "pack0" + ROWS_SUFFIX: torch.tensor([0, 5])},
            "shape",
            r"in \[0, 4\)",
        ),
        (
            {**dense, **rows, "pack0" + ROWS_SUFFIX: torch.tensor([1])},
            "shape",
            "need 4 values, got 8",
        ),
        ({"pack1": torch.ones(4), **rows}, "shape", "has 4 elements, expected 5"),
    ]
    for tensors, kind, match in bad:
        with pytest.raises(WireError, match=match) as err:
            shard.check_push(tensors, "gradient")
        assert err.value.kind == kind


def test_shard_rejects_bad_descriptions_and_optimizers():
    config = ParameterServer().config(1)
    with pytest.raises(WireError, match="bad parameter description"):
        Shard(0).register_first(config, [{"name": "w"}], _sgd_spec(), {})
    with pytest.raises(WireError, match="missing initial value"):
        Shard(0).register_first(config, _metas(), _sgd_spec(), {})
    with pytest.raises(WireError) as err:
        Shard(0).register_first(
            config, _metas(), {"names": ["Pickle"], "groups": [{}]}, {"w[0:2]": torch.ones(2)}
        )
    assert err.value.kind == "optimizer"
    dense_adam = {"names": ["SparseAdam"], "groups": [{}]}
    with pytest.raises(WireError, match="w: SparseAdam steps only sparse-gradient tables"):
        Shard(0).register_first(config, _metas(), dense_adam, {"w[0:2]": torch.ones(2)})
    uneven = {"names": ["SGD", "SGD"], "groups": [{}]}
    with pytest.raises(WireError, match="bad optimizer spec"):
        Shard(0).register_first(config, _metas(), uneven, {"w[0:2]": torch.ones(2)})


# -- max_grad_norm ----------------------------------------------------------------------------
@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
def test_the_clip_coefficient_from_shard_parts_is_clip_grad_norm_s(max_norm):
    grads = [torch.randn(40, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    params = [torch.nn.Parameter(torch.zeros(40)) for _ in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    # three shards, one of them holding two halves of a split tensor
    parts = [float(grads[0].pow(2).sum()), float(grads[1][:25].pow(2).sum())]
    parts += [float(grads[1][25:].pow(2).sum() + grads[2].pow(2).sum())]
    scale = clip_coefficient(parts, max_norm)
    assert (scale < 1.0) == (max_norm < 10)  # (the norm is about 11)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * scale, rtol=1e-6, atol=0)


def test_servers_share_their_norm_parts_and_a_silent_one_is_named():
    import torch.distributed as dist

    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=0.2))  # (a job's store waits the job's timeout)
    first, second = (NormExchange(store, "job/", rank, 2, timeout=0.2) for rank in (0, 1))
    store.set("job/grad-norm/0/1", repr(4.0))  # server 1 published its part of step 0 first
    assert first.gather(0, 9.0) == [9.0, 4.0]
    silent = r"server\(s\) \[0\] did not publish .* for sync step 1 within 0.2s"
    with pytest.raises(PeerTimeoutError, match=silent):
        second.gather(1, 1.5)  # server 0 has not reached step 1
    assert first.gather(1, 2.5) == [2.5, 1.5]  # server 1's part waited for it
    for step in (2, 3):
        store.set(f"job/grad-norm/{step}/1", "0.0")
        first.gather(step, 0.0)
    assert not any(store.check([f"job/grad-norm/{step}/0"]) for step in (0, 1))  # forgotten


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "eventually"}, ValueError, "mode must be one of"),
        ({"push": "delta"}, ValueError, "push='delta' needs mode='async'"),
        ({"max_staleness": 2}, ValueError, "max_staleness applies to mode='async'"),
        ({"mode": "async", "backup_workers": 1}, ValueError, "apply to mode='sync'"),
        ({"mode": "async", "max_staleness": -1}, ValueError, "max_staleness must be >= 0"),
        ({"backup_workers": True}, TypeError, "backup_workers must be an int"),
        ({"servers": 0}, ValueError, "servers must be >= 1"),
        ({"max_grad_norm": 0}, ValueError, "max_grad_norm must be positive and finite"),
        ({"max_grad_norm": float("nan")}, ValueError, "max_grad_norm must be positive"),
        ({"max_grad_norm": "1"}, TypeError, "max_grad_norm must be a number or None"),
        ({"mode": "async", "max_grad_norm": 1.0}, ValueError, "max_grad_norm applies to"),
        ({"compression": "int8"}, ValueError, r"compression must be None or one of \['fp16'"),
        (
            {"mode": "async", "push": "delta", "compression": "bf16"},
            ValueError,
            "compression applies to push='grad'",
        ),
    ],
)
def test_strategy_validates_itself(kwargs, error, match):
    with pytest.raises(error, match=match):
        ParameterServer(**kwargs)


def test_strategy_names_and_job_checks():
    assert ParameterServer().name == "ps-sync"
    assert ParameterServer(mode="async").name == "ps-async"
    assert ParameterServer(mode="async", push="delta").name == "ps-async-delta"
    ctx = SimpleNamespace(role="worker", servers=0, world_size=4, secret=b"k" * 32)
    with pytest.raises(UsageError, match="concord run -n N --servers S"):
        ParameterServer().check_job(ctx)
    ctx.servers = 1
    with pytest.raises(UsageError, match=r"servers=2\) but the job started 1"):
        ParameterServer(servers=2).check_job(ctx)
    with pytest.raises(UsageError, match="backup_workers=4 must be < the number of workers"):
        ParameterServer(backup_workers=4).check_job(ctx)
    ctx.secret = b""
    with pytest.raises(UsageError, match="CONCORD_SECRET"):
        ParameterServer().check_job(ctx)


# -- the server loop, through a fake channel ------------------------------------------------
class FakeChannel:
    """Records replies instead of sending them."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Message]] = []
        self.rejected: Counter[str] = Counter()
        self.bytes_in = self.bytes_out = 0
        self.lane_bytes = LaneBytes(0, 0, 0)
        self.local_messages = [0, 0]

    def reply(self, peer: bytes, msg: Message, track: bool = False):
        self.sent.append((peer, msg))

    def has_lanes(self, peer: bytes) -> bool:
        return False

    def reply_many(self, peers: list[bytes], msg: Message, track: bool = False, before_part=None):
        if before_part is not None:  # the whole message is one part here
            before_part(msg)
        self.sent.extend((peer, msg) for peer in peers)
        return [None] * len(peers)

    def take(self) -> list[tuple[bytes, str, int]]:
        out = [(peer, msg.op, msg.step) for peer, msg in self.sent]
        self.sent = []
        return out


def _server(workers: int, **kwargs) -> tuple[ShardServer, FakeChannel]:
    chan = FakeChannel()
    server = ShardServer(chan, rank=0, workers=workers, timeout=10)
    config = ParameterServer(**kwargs).config(workers)
    for w in range(workers):
        meta = {"config": config, "params": _metas(), "optimizer": _sgd_spec()}
        tensors = {"w[0:2]": torch.zeros(2)} if w == 0 else {}
        server.dispatch(
            Request(b"w%d" % w, Message("register", worker=w, meta=meta, tensors=tensors), 0)
        )
    assert [op for _, op, _ in chan.take()] == ["params"] * workers
    return server, chan


def _push(server: ShardServer, worker: int, step: int, value: float = 1.0) -> None:
    msg = Message("push", worker=worker, step=step, tensors={"pack0": torch.full((2,), value)})
    server.dispatch(Request(b"w%d" % worker, msg, 0))


def test_server_holds_a_worker_that_runs_too_far_ahead():
    server, chan = _server(3, mode="async", max_staleness=1)
    _push(server, 0, 0)
    assert chan.take() == [(b"w0", "params", 1)]  # lead 1: may go on
    _push(server, 0, 1)
    assert chan.take() == []  # lead 2 > 1: held
    _push(server, 1, 0)
    assert chan.take() == [(b"w1", "params", 3)]  # the slowest (worker 2) is still at 0
    _push(server, 2, 0)  # now min clock is 1: worker 0 (clock 2) is released
    assert sorted(chan.take()) == [(b"w0", "params", 4), (b"w2", "params", 4)]
    stats = server.stats()
    assert stats["max_lead"] == 1 and stats["gate_waits"] == 1
    assert stats["staleness"] == {"0": 2, "2": 1, "3": 1}
    assert 0 < stats["cpu_seconds"] <= time.process_time()  # this process is the server


def test_async_replies_to_lane_peers_send_the_live_shard_and_others_a_copy():
    for lanes in (False, True):
        server, chan = _server(2, mode="async")
        chan.has_lanes = lambda peer, lanes=lanes: lanes  # lanes copy the bytes as they go
        _push(server, 0, 0)
        ((_, msg),) = chan.sent
        live = msg.tensors["pack0"].data_ptr() == server.shard.flats["pack0"].data_ptr()
        assert live == lanes and torch.equal(msg.tensors["pack0"], torch.full((2,), -0.5))


def _table_server(workers: int, **kwargs) -> tuple[ShardServer, FakeChannel]:
    """A server holding piece ``e[4:80]`` (rows 1..19) of a 20x4 sparse table, plain SGD lr 1."""
    chan = FakeChannel()
    server = ShardServer(chan, rank=0, workers=workers, timeout=10)
    config = ParameterServer(**kwargs).config(workers)
    metas = [piece_meta(Piece("e", 4, 80, 0), (20, 4), "float32", 0, sparse=True)]
    meta = {
        "config": config,
        "params": metas,
        "optimizer": {"names": ["SGD"], "groups": [{"lr": 1}]},
    }
    for w in range(workers):
        tensors = {"e[4:80]": torch.zeros(76)} if w == 0 else {}
        msg = Message("register", worker=w, meta=meta, tensors=tensors)
        server.dispatch(Request(b"w%d" % w, msg, 0))
    chan.take()
    return server, chan


def _push_rows(server: ShardServer, worker: int, step: int, rows: list[int] | None, **meta):
    """Worker ``worker`` pushes a gradient of ones on ``rows`` (dense when ``rows`` is None)."""
    tensors = {"pack0": torch.ones(76)}
    if rows is not None:
        tensors = {
            "pack0": torch.ones(4 * len(rows)),
            "pack0@rows": torch.tensor(rows, dtype=torch.int64),
        }
    msg = Message("push", worker=worker, step=step, meta=meta, tensors=tensors)
    server.dispatch(Request(b"w%d" % worker, msg, 0))


def test_async_replies_carry_the_rows_changed_since_the_version_the_push_names():
    """A sparse table's piece under plain SGD: an async reply carries the rows changed after
    the version the push names (its worker's last loaded reply), other workers' rows
    included, and their current values; the whole piece once the rows would take half its
    bytes or more; nothing for a push without a gradient. Workers released together get the
    rows the one that holds the oldest version needs. push="delta": the rows of a change,
    added, answered the same way."""
    server, chan = _table_server(2, mode="async")
    flat = server.shard.flats["pack0"].view(19, 4)  # rows 1..19
    expected = [
        (0, 0, [1, 2], [1, 2]),  # -> version 1
        (1, 0, [2, 5], [1, 2, 5]),  # holds 0: worker 0's rows too -> 2
        (0, 1, [7], [2, 5, 7]),  # holds 1 -> 3
        (1, 2, [1, 3, 4, 6, 8, 9], None),  # 7 changed rows (+ numbers) > half the piece -> 4
        (0, 3, None, None),  # a dense gradient changes every row -> 5
    ]
    for version, (worker, step, rows, replied) in enumerate(expected, 1):
        _push_rows(server, worker, step, rows)
        ((peer, msg),) = chan.sent
        chan.sent = []
        assert (peer, msg.step) == (b"w%d" % worker, version)
        got = msg.tensors.get("pack0@rows")
        assert (None if got is None else got.tolist()) == replied
        want = flat.reshape(-1) if got is None else flat[got - 1].reshape(-1)
        assert torch.equal(msg.tensors["pack0"], want)
    assert flat[1].tolist() == [-3.0] * 4  # row 2: pushed by workers 0, 1 and the dense one
    _push_rows(server, 0, 5, [], absent=[0])  # no gradient: nothing changed since 5
    ((_, msg),) = chan.sent
    assert msg.step == 6 and msg.tensors["pack0@rows"].tolist() == []
    assert msg.tensors["pack0"].numel() == 0

    server, chan = _table_server(3, mode="async", max_staleness=1)
    for worker, step, rows in [(0, 0, [1]), (0, 1, [2]), (1, 0, [3]), (2, 0, [4])]:
        _push_rows(server, worker, step, rows)
    replies = [(peer, msg.step, msg.tensors["pack0@rows"].tolist()) for peer, msg in chan.sent]
    # worker 0 (holding 1) was held at its second push; worker 2 (holding 0) releases it
    assert replies[-2:] == [(b"w0", 4, [1, 2, 3, 4]), (b"w2", 4, [1, 2, 3, 4])]

    server, chan = _table_server(2, mode="async", push="delta")  # rows of a parameter change
    _push_rows(server, 0, 0, [2, 3])
    _push_rows(server, 1, 0, [3, 9])
    ((_, first), (_, second)) = chan.sent
    assert first.tensors["pack0@rows"].tolist() == [2, 3]
    assert second.tensors["pack0@rows"].tolist() == [2, 3, 9]
    assert second.tensors["pack0"].tolist() == [1.0] * 4 + [2.0] * 4 + [1.0] * 4  # added
    assert server.shard.flats["pack0"].sum() == 16


def test_server_sync_round_with_backup_worker_and_min_workers_timeout():
    server, chan = _server(3, mode="sync", backup_workers=1)
    _push(server, 0, 0, 1.0)
    _push(server, 2, 0, 3.0)
    assert sorted(chan.take()) == [(b"w0", "params", 1), (b"w2", "params", 1)]
    assert torch.equal(server.shard.values["w[0:2]"], torch.full((2,), -1.0))  # lr .5 * mean 2
    _push(server, 1, 0)  # late
    assert chan.take() == [(b"w1", "params", 1)] and server.stats()["dropped_log"] == [[1, 0]]

    server, chan = _server(2, mode="sync", min_workers=1)
    _push(server, 0, 0)
    server.check_deadlines(server.round_started + 11)  # worker 1 silent past the timeout
    assert chan.take() == [(b"w0", "params", 1)] and server.lost == {1}
    _push(server, 0, 1)  # the survivor goes on alone
    assert chan.take() == [(b"w0", "params", 2)]


def test_server_answers_bad_requests_and_goes_on():
    server, chan = _server(2, mode="sync")
    server.dispatch(Request(b"x", Message("shutdown", worker=0), 0))
    server.dispatch(Request(b"x", Message("push", worker=9, step=0), 0))
    msg = Message("push", worker=0, step=0, tensors={"w[0:2]": torch.ones(5)})
    server.dispatch(Request(b"x", msg, 0))
    msg = Message("push", worker=0, meta={"absent": [1]}, tensors={"pack0": torch.ones(2)})
    server.dispatch(Request(b"x", msg, 0))
    replies = [m for _, m in chan.sent]
    assert [m.meta["kind"] for m in replies] == ["op", "header", "shape", "header"]
    assert "unknown op 'shutdown'" in replies[0].meta["error"]
    chan.sent = []
    server, chan = _server(2, mode="sync")
    _push(server, 0, 0)
    server.check_deadlines(server.round_started + 11)  # no min_workers: the job must end
    assert server.fatal and "worker(s) [1] sent no gradient" in server.fatal
    assert chan.sent[0][1].meta["kind"] == "timeout"


def test_describe_names_parameters_in_optimizer_order_with_groups():
    from concord.strategies.ps.client import describe

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.SGD(
        [{"params": model[1].parameters()}, {"params": model[0].parameters(), "lr": 1.0}], lr=0.1
    )
    _, infos = describe(model, opt)
    assert [(i.name, i.shape, i.dtype, i.group) for i in infos] == [
        ("1.weight", (1, 3), "float32", 0),
        ("1.bias", (1,), "float32", 0),
        ("0.weight", (3, 2), "float32", 1),
        ("0.bias", (3,), "float32", 1),
    ]
    stray = torch.optim.SGD([torch.nn.Parameter(torch.ones(4))], lr=0.1)
    with pytest.raises(UsageError, match=r"optimizer parameter #0 of shape \[4\] is not a param"):
        describe(model, stray)


def test_worker_packs_gradients_per_dtype_run_with_zeros_for_the_absent():
    from concord.strategies.ps.client import PSOptimizer, describe

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False))
    model[1].double()  # a dtype change starts a new pack: 1.weight alone
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params, infos = describe(model, opt)
    lane = np.zeros(1 << 10, dtype=np.uint8)
    asked: list[int] = []

    def lane_space(nbytes: int):  # like ClientChannel.lane_space: room for the first pack only
        asked.append(nbytes)
        return lane[:nbytes] if len(asked) == 1 else None

    ctx = SimpleNamespace(rank=0, world_size=1, timeout=5)
    chan = SimpleNamespace(lane_space=lane_space)
    ps = PSOptimizer(
        opt, ParameterServer(), ctx, params, infos, plan_shards(infos, 1).shards, [chan]
    )
    ps._finalizer.detach()  # no servers to say goodbye to
    for p in params:
        p.grad = torch.randn_like(p)
    model[0].bias.grad = None
    packs, absent = ps._grads(0)
    assert list(packs) == ["pack0", "pack1"] and absent == [1]  # 0.bias is piece 1
    assert asked == [4 * 15, 8 * 6]
    assert torch.equal(
        packs["pack0"], torch.cat([model[0].weight.grad.reshape(-1), torch.zeros(3)])
    )
    assert packs["pack0"].data_ptr() == lane.ctypes.data  # built in the lane: sent as is
    assert packs["pack1"].data_ptr() == model[1].weight.grad.data_ptr()  # one piece: no copy


def test_server_loads_worker_0s_checkpoint_and_holds_the_others_until_then():
    server, chan = _server(3, mode="sync")
    server.dispatch(Request(b"w1", Message("load_state", worker=1), 0))
    assert chan.take() == []  # held until worker 0's checkpoint is in
    state = {"state0": torch.full((2,), 0.5)}  # SGD momentum_buffer of piece 0
    meta = {"state": [[0, "momentum_buffer"]], "hp": [{"lr": 0.25, "momentum": 0.9}]}
    tensors = {"pack0": torch.full((2,), 3.0), **state}
    server.dispatch(Request(b"w0", Message("load_state", worker=0, meta=meta, tensors=tensors), 0))
    assert sorted(chan.take()) == [(b"w0", "params", 0), (b"w1", "params", 0)]
    assert torch.equal(server.shard.values["w[0:2]"], torch.full((2,), 3.0))
    server.dispatch(Request(b"w2", Message("load_state", worker=2), 0))  # after: at once
    assert chan.take() == [(b"w2", "params", 0)]
    for w in range(3):
        _push(server, w, 0, 1.0)  # momentum 0.9 * 0.5 + grad 1 = 1.45; lr 0.25 from the hp
    assert torch.equal(server.shard.values["w[0:2]"], torch.full((2,), 3.0 - 0.25 * 1.45))
    assert len(chan.take()) == 3  # the round's replies
    server.dispatch(Request(b"w0", Message("state", worker=0), 0))
    ((_, reply),) = chan.sent
    assert reply.meta["state"] == [[0, "momentum_buffer"]] and reply.step == 1
    assert torch.equal(reply.tensors["state0"], torch.full((2,), 1.45))
    chan.take()
    server.dispatch(Request(b"w0", Message("load_state", worker=0, meta=meta, tensors=tensors), 0))
    ((_, error),) = chan.sent  # after the first update: refused, and nothing changed
    assert error.op == "error" and "must come before the first step" in error.meta["error"]
    assert torch.equal(server.shard.values["w[0:2]"], torch.full((2,), 3.0 - 0.25 * 1.45))

    server, chan = _server(2, mode="sync")  # a state that does not fit changes nothing
    bad = {"pack0": torch.full((2,), 3.0), "state0": torch.ones(3)}
    server.dispatch(Request(b"w0", Message("load_state", worker=0, meta=meta, tensors=bad), 0))
    ((_, error),) = chan.sent
    assert error.meta["kind"] == "shape"
    assert "'momentum_buffer' has 3 elements, expected 2" in error.meta["error"]
    group = server.shard.optimizer.param_groups[0]
    assert group["lr"] == 0.5 and group["momentum"] == 0  # the spec's, not the checkpoint's
    assert torch.equal(server.shard.values["w[0:2]"], torch.zeros(2)) and not server.loaded

    server, chan = _server(2, mode="async")
    server.dispatch(Request(b"w1", Message("load_state", worker=1), 0))
    server.check_deadlines(time.monotonic() + 11)  # worker 0 never sends its checkpoint
    ((peer, error),) = chan.sent
    assert peer == b"w1" and error.meta["kind"] == "timeout"
    assert "worker 0 did not load its checkpoint within 10s" in error.meta["error"]


class PartsChannel(FakeChannel):
    """A FakeChannel that cuts every reply into parts of one tensor each, stepping before
    each part as the real channel does, and keeps each peer's parts for :class:`Loopback`."""

    def reply_many(self, peers: list[bytes], msg: Message, track: bool = False, before_part=None):
        parts = split_message(msg, 0, part_bytes=1)
        for part in parts:
            if before_part is not None:
                before_part(part)
        self.sent.extend((peer, parts) for peer in peers)
        return [None] * len(peers)


class Loopback:
    """A worker's channel wired straight into an in-process ShardServer."""

    def __init__(self, server: ShardServer, peer: bytes) -> None:
        self.server, self.peer = server, peer

    def lane_space(self, nbytes: int) -> None:
        return None

    def send(self, msg: Message) -> None:
        self.server.dispatch(Request(self.peer, msg, 0))

    def recv(self, awaiting: str, timeout=None, on_part=None, views: bool = False) -> Message:
        sent = self.server.chan.sent
        i = next(i for i, (peer, _) in enumerate(sent) if peer == self.peer)
        parts = sent.pop(i)[1]
        parts = parts if isinstance(parts, list) else [parts]
        for part in parts:
            if on_part is not None:
                on_part(part)
        whole = parts[0]
        for part in parts[1:]:
            whole = Message(whole.op, step=whole.step, tensors={**whole.tensors, **part.tensors})
        return whole


def _loopback_ps(model, opt, strategy: ParameterServer, chan: FakeChannel):
    """One worker's registered ``PSOptimizer`` over an in-process server on ``chan``."""
    from concord.strategies.ps.client import PSOptimizer, describe
    from concord.strategies.sparse import sparse_grad_params

    server = ShardServer(chan, rank=0, workers=1, timeout=10)
    params, infos = describe(model, opt)
    ctx = SimpleNamespace(rank=0, world_size=1, timeout=5)
    shards = plan_shards(infos, 1).shards
    chans = [Loopback(server, b"w0")]
    sparse = sparse_grad_params(model)
    ps = PSOptimizer(opt, strategy, ctx, params, infos, shards, chans, sparse)
    ps._finalizer.detach()
    ps._finalizer = weakref.finalize(ps, lambda: None)  # open, and no goodbye to send
    spec = spec_from_optimizer(opt).to_json() if strategy.push == "grad" else None
    ps.register(spec)
    return ps, server


def _reply_keys(chan: FakeChannel) -> list[list[str]]:
    """The tensor keys of each reply ``chan`` sends from now on, in order."""
    replies: list[list[str]] = []
    original = chan.reply_many

    def record(peers, msg, track=False, before_part=None):
        replies.append(list(msg.tensors))
        return original(peers, msg, track, before_part)

    chan.reply_many = record
    return replies


def _table_model() -> torch.nn.Module:
    torch.manual_seed(0)
    table = torch.nn.Embedding(40, 3, sparse=True)  # a pack of its own, before the head's
    return torch.nn.ModuleDict({"table": table, "head": torch.nn.Linear(3, 2)})


def _table_loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    ids = torch.tensor([[step, 2 * step + 1, 7], [30 - step, 7, 39]])
    return model["head"](model["table"](ids).sum(1)).pow(2).mean()


@pytest.mark.parametrize(
    ("kind", "mode"),
    [(k, "sync") for k in ("adagrad", "sgd", "sgd-clip", "sgd-momentum")]
    + [("adagrad", "async"), ("sgd-momentum", "async")],
)
def test_a_round_replies_with_the_touched_rows_when_only_they_change(kind, mode):
    """One worker, one server, the table alone in its pack: pushes carry its rows; the server
    steps only those rows and replies with them (numbers and values in separate parts) when
    the optimizer leaves other rows alone (Adagrad, plain SGD, also with max_grad_norm), else
    steps and sends the whole table (momentum moves every row it ever touched). Async, the
    rows changed since the worker's last reply: with one worker, the same. The worker's
    model equals one process's, step by step."""
    from concord.strategies.ps.client import _row_tables, describe
    from concord.strategies.sparse import clip_grad_norm, sparse_grad_params

    def optimizer(model):
        if kind == "adagrad":
            return torch.optim.Adagrad(model.parameters(), lr=0.3)
        momentum = 0.9 if kind == "sgd-momentum" else 0.0
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)

    chan = PartsChannel()
    model = _table_model()
    opt = optimizer(model)
    params, infos = describe(model, opt)
    assert sparse_grad_params(model) == {id(params[0])}
    tables = _row_tables(opt, params, infos, {id(params[0])})  # not cut into pieces
    assert tables == (set() if kind == "sgd-momentum" else {"table.weight"})
    strategy = ParameterServer(mode, max_grad_norm=0.5 if kind == "sgd-clip" else None)
    ps, server = _loopback_ps(model, opt, strategy, chan)
    server.norms = None  # (one server: the clip needs no store)
    reference = _table_model()
    ref_opt = optimizer(reference)
    replies = _reply_keys(chan)
    for step in range(4):
        for m, o in ((model, ps), (reference, ref_opt)):
            o.zero_grad()
            _table_loss(m, step).backward()
            if kind == "sgd-clip" and o is ref_opt:
                clip_grad_norm(reference.parameters(), 0.5)  # (sparse gradients too)
            o.step()
        for got, want in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # float32 sums
    rows = kind != "sgd-momentum"
    assert replies == [["pack0@rows", "pack0", "pack1"] if rows else ["pack0", "pack1"]] * 4
    stats = server.stats()
    assert stats["rejected"] == {} and stats["clipped"] == (4 if kind == "sgd-clip" else 0)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_zero_width_sparse_table_goes_as_an_empty_pack(mode):
    """``nn.Embedding(5, 0, sparse=True)`` has rows without elements, which no row message
    can carry: its piece goes as an empty dense pack, and the rest trains as in one process."""

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = _table_model()
        model["zero"] = torch.nn.Embedding(5, 0, sparse=True)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    model, opt = build()
    ps, server = _loopback_ps(model, opt, ParameterServer(mode), PartsChannel())
    reference, ref_opt = build()
    for step in range(3):
        for m, o in ((model, ps), (reference, ref_opt)):
            o.zero_grad()
            ids = torch.tensor([[step, 4]])
            (_table_loss(m, step) + m["zero"](ids).sum()).backward()
            o.step()
        for got, want in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert server.stats()["rejected"] == {}


def test_a_delta_push_under_sparse_adam_carries_the_touched_rows():
    """push="delta" with ``torch.optim.SparseAdam`` on the worker (lazy: it moves only the
    rows with a gradient): each push carries the change of the rows the step touched, each
    reply those rows back; the model equals one process's SparseAdam training."""

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"table": torch.nn.Embedding(40, 3, sparse=True)})
        return model, torch.optim.SparseAdam(model.parameters(), lr=0.1)

    chan = FakeChannel()
    model, opt = build()
    ps, server = _loopback_ps(model, opt, ParameterServer("async", push="delta"), chan)
    pushed, replied = [], []
    dispatch = server.dispatch
    server.dispatch = lambda req: (pushed.append(dict(req.msg.tensors)), dispatch(req))
    original = chan.reply_many

    def record(peers, msg, track=False, before_part=None):
        replied.append(msg.tensors.get("pack0@rows"))
        return original(peers, msg, track, before_part)

    chan.reply_many = record
    reference, ref_opt = build()
    for step in range(4):
        for m, o in ((model, ps), (reference, ref_opt)):
            o.zero_grad()
            ids = torch.tensor([[step, 2 * step + 1, 7]])
            m["table"](ids).pow(2).sum().backward()
            o.step()
        for got, want in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        rows = sorted({step, 2 * step + 1, 7})
        assert pushed[-1]["pack0@rows"].tolist() == rows
        assert pushed[-1]["pack0"].numel() == 3 * len(rows)
        assert replied[-1].tolist() == rows  # (one worker: only its own rows changed)
    assert server.stats()["rejected"] == {}


def _two_optimizers(model: torch.nn.Module) -> MultiOptimizer:
    """The usual recipe: SparseAdam for the table, Adam (two groups) for the head."""
    head = [{"params": [model["head"].weight]}, {"params": [model["head"].bias], "lr": 0.05}]
    return MultiOptimizer(
        torch.optim.SparseAdam(model["table"].parameters(), lr=0.1),
        torch.optim.Adam(head, lr=0.02, weight_decay=0.01),
    )


@pytest.mark.parametrize("mode", ["sync", "async", "delta"])
def test_two_optimizers_step_on_the_server_as_in_one_process(mode):
    """``[SparseAdam(table), Adam(head)]`` (a MultiOptimizer): the server builds one of each
    over its pieces (Adam fused; push="delta": both step on the worker), the table's pushes
    and replies are its touched rows (SparseAdam moves only those), and the model equals one
    process's, step by step. The state comes back in torch's format (SparseAdam's step an
    int) and loads back."""
    from concord.strategies.ps.client import _check_sparse_only, describe

    chan = PartsChannel()
    model = _table_model()
    strategy = ParameterServer("async", push="delta") if mode == "delta" else ParameterServer(mode)
    ps, server = _loopback_ps(model, _two_optimizers(model), strategy, chan)
    built = server.shard.optimizer
    if mode != "delta":
        assert [type(o).__name__ for o in built.optimizers] == ["SparseAdam", "Adam"]
        assert [g.get("fused") for g in built.param_groups] == [None, True, True]
        assert server.shard.values["table.weight[0:120]"].shape == (40, 3)  # steps by row
    reference = _table_model()
    ref_opt = _two_optimizers(reference)
    replies = _reply_keys(chan)

    def train(model: torch.nn.Module, ps: Any, steps: range) -> None:
        for step in steps:
            for m, o in ((model, ps), (reference, ref_opt)):
                o.zero_grad()
                _table_loss(m, step).backward()
                o.step()
            for got, want in zip(model.parameters(), reference.parameters()):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    train(model, ps, range(3))
    assert replies == [["pack0@rows", "pack0", "pack1"]] * 3
    saved, want = ps.state_dict(), ref_opt.state_dict()
    assert saved["param_groups"] == want["param_groups"]
    assert saved["state"][0]["step"] == 3 and type(saved["state"][0]["step"]) is int
    for index, state in want["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(saved["state"][index][key], value, rtol=1e-5, atol=1e-6)
    assert server.stats()["rejected"] == {}
    resumed = _table_model()  # a fresh job from the checkpoint (SparseAdam's count goes to
    resumed.load_state_dict(reference.state_dict())  # the server as a tensor, comes back)
    again, server = _loopback_ps(resumed, _two_optimizers(resumed), strategy, chan)
    again.load_state_dict(saved)
    train(resumed, again, range(3, 5))
    assert again.state_dict()["state"][0]["step"] == 5
    assert server.stats()["rejected"] == {}
    misplaced = MultiOptimizer(torch.optim.SparseAdam(model.parameters()))
    params, infos = describe(model, misplaced)
    with pytest.raises(UsageError, match="SparseAdam takes only sparse gradients.*'head.weight'"):
        _check_sparse_only(spec_from_optimizer(misplaced), params, infos, {id(params[0])})


def test_push_delta_resumes_an_optimizer_the_servers_do_not_know():
    """push="delta" keeps the optimizer on the worker, so any optimizer (here Adamax, not on
    the servers' allow-list) loads a checkpoint and goes on as one process does."""

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        return model, torch.optim.Adamax(model.parameters(), lr=0.1)

    def step(model: torch.nn.Module, opt: Any, k: int) -> None:
        opt.zero_grad()
        model(torch.full((2, 3), float(k))).pow(2).mean().backward()
        opt.step()

    reference, ref_opt = build()
    step(reference, ref_opt, 1)
    model, opt = build()
    ps, server = _loopback_ps(model, opt, ParameterServer("async", push="delta"), PartsChannel())
    model.load_state_dict(reference.state_dict())
    ps.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # (torch would alias its tensors)
    for k in (2, 3):
        step(model, ps, k)
        step(reference, ref_opt, k)
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert server.stats()["rejected"] == {}


@pytest.mark.parametrize(("compression", "mode"), [("fp16", "sync"), ("bf16", "async")])
def test_compressed_pushes_carry_half_precision_and_the_server_steps_in_full(compression, mode):
    """``compression``: every float pack of a push (the table's rows too) is half precision on
    the wire; the server widens it, steps in float32 and answers in float32. Equal to one
    process whose gradients are rounded the same way, step by step."""
    wire = {"fp16": torch.float16, "bf16": torch.bfloat16}[compression]

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = _table_model()
        return model, torch.optim.Adagrad(model.parameters(), lr=0.3)

    chan = PartsChannel()
    model, opt = build()
    strategy = ParameterServer(mode, compression=compression)
    ps, server = _loopback_ps(model, opt, strategy, chan)
    pushed = []
    dispatch = server.dispatch
    server.dispatch = lambda req: (pushed.append(dict(req.msg.tensors)), dispatch(req))
    replies = _reply_keys(chan)
    reference, ref_opt = build()
    for step in range(3):
        for m, o in ((model, ps), (reference, ref_opt)):
            o.zero_grad()
            _table_loss(m, step).backward()
        for p in reference.parameters():  # what the wire does to the reference's gradients
            g = p.grad.coalesce() if p.grad.is_sparse else p.grad
            p.grad = (
                torch.sparse_coo_tensor(g.indices(), g.values().to(wire).float(), g.shape)
                if g.is_sparse
                else g.to(wire).float()
            )
        ps.step()
        ref_opt.step()
        for got, want in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        dtypes = {key: t.dtype for key, t in pushed[-1].items()}
        assert dtypes == {"pack0@rows": torch.int64, "pack0": wire, "pack1": wire}
    assert replies == [["pack0@rows", "pack0", "pack1"]] * 3  # (float32: the model's own)
    assert server.stats()["rejected"] == {}
