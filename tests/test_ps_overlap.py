"""``ParameterServer(overlap=True)``: early pushes from autograd hooks, pulls in the background.

Same tolerance as tests/test_ps.py: 1e-5 relative (atol 1e-6); the servers average float32
gradients in arrival order, one process takes the mean over the global batch.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from ps_harness import run_ps_job
from test_ps import GLOBAL_BATCH, STEPS, BranchNet, _batch, _optimizer, _reference, _sync_worker
from torch import nn
from torch.nn import functional as F

import concord
from concord.algorithms.ps_plan import plan_shards
from concord.comm.channel import ClientChannel
from concord.comm.server_channel import ServerChannel
from concord.comm.wire import Codec, Message
from concord.strategies.ps.client import describe
from concord.strategies.ps.overlap import OverlapPSOptimizer

SECRET = b"overlap-test-secret-0123456789"


def test_overlap_is_validated():
    assert concord.ParameterServer().overlap is False
    with pytest.raises(TypeError, match="overlap must be True or False"):
        concord.ParameterServer(overlap=1)
    with pytest.raises(ValueError, match="overlap=True needs push='grad'"):
        concord.ParameterServer(mode="async", push="delta", overlap=True)
    # a worker-side setting: the servers' config does not carry it
    assert "overlap" not in concord.ParameterServer(overlap=True).config(2)


@pytest.mark.timeout(120)
def test_sync_ps_with_overlap_equals_one_process_on_the_global_batch():
    kwargs = {"mode": "sync", "overlap": True}
    job = run_ps_job(_sync_worker, 2, 2, args=("sgd", kwargs))
    reference = _reference("sgd")
    for params, stats in job.results:
        for got, want in zip(params, reference):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert [s["version"] for s in stats] == [STEPS, STEPS]
    assert all(s["dropped"] == 0 and s["pushes"] == 2 * STEPS for s in job.results[0][1])
    assert job.server_codes == [0, 0]


def _accumulating_worker(micro: int) -> list[torch.Tensor]:
    """Each step: ``micro`` backward passes over parts of this worker's slice, then step()."""
    ctx = concord.init(timeout=60)
    torch.manual_seed(0)
    model = BranchNet()
    opt = _optimizer("sgd", model)
    strategy = concord.ParameterServer(mode="sync", overlap=True)
    model, opt = concord.distribute(model, opt, strategy)
    for step in range(STEPS):
        x, y = _batch(step)
        mine = torch.arange(ctx.rank, GLOBAL_BATCH, ctx.world_size)
        opt.zero_grad()
        for part in mine.chunk(micro):
            (F.cross_entropy(model(x[part], step % 3 == 0), y[part]) / micro).backward()
        opt.step()
    assert opt._k == micro  # steps after the first pushed during their last backward
    assert opt.early_pushes == STEPS - 1
    opt.server_stats()
    opt.close()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.timeout(120)
def test_gradient_accumulation_with_overlap_equals_one_step_on_the_bigger_batch():
    job = run_ps_job(_accumulating_worker, 2, 1, args=(2,))
    reference = _reference("sgd")
    for params in job.results:
        for got, want in zip(params, reference):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _async_overlap_worker(steps: int) -> tuple[float, float, list]:
    ctx = concord.init(timeout=60)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    strategy = concord.ParameterServer(mode="async", overlap=True)
    model, opt = concord.distribute(model, opt, strategy)
    teacher = torch.randn(6, 3, generator=torch.Generator().manual_seed(7))
    batches = [(x, (x @ teacher).argmax(1)) for x, _ in (_batch(i) for i in range(4))]

    def loss() -> float:
        with torch.no_grad():
            return sum(F.cross_entropy(model(x), y).item() for x, y in batches) / len(batches)

    first = loss()
    for step in range(steps):
        x, y = batches[(step + ctx.rank) % len(batches)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.synchronize()
    last = loss()
    stats = opt.server_stats()
    opt.close()
    return first, last, stats


@pytest.mark.timeout(120)
def test_async_grad_with_overlap_trains():
    steps = 40
    job = run_ps_job(_async_overlap_worker, 2, 2, args=(steps,))
    for first, last, _ in job.results:
        assert last < 0.3 * first, (first, last)  # one process: 1.11 -> 0.10
    # the worker whose last push was answered last read its stats after every push of both
    # (the other's push to one server may still be in flight when it reads: ties on server 0
    # alone picked such a read once)
    stats = max((r[2] for r in job.results), key=lambda st: sum(s["pushes"] for s in st))
    assert [s["pushes"] for s in stats] == [2 * steps, 2 * steps]


def _serve(chan: ServerChannel, stop: threading.Event, answer_pushes: bool) -> None:
    """A one-worker server: answers registration with the registered values, and pushes
    with unchanged values if ``answer_pushes`` (else it stops answering after registration)."""
    values: dict = {}
    while not stop.is_set():
        req = chan.poll(timeout=0.05)
        if req is None:
            continue
        if req.msg.op == "register":  # one pack: the pieces in order
            values = {"pack0": torch.cat([t.reshape(-1) for t in req.msg.tensors.values()])}
        if req.msg.op == "register" or (answer_pushes and req.msg.op == "push"):
            chan.reply(req.peer, Message("params", step=0, tensors=values))
        elif answer_pushes and req.msg.op == "goodbye":
            chan.reply(req.peer, Message("bye"))


@contextmanager
def _in_process(answer_pushes: bool, timeout: float):
    """A linear model wrapped by an OverlapPSOptimizer talking to a server thread."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    server, stop = ServerChannel(Codec(SECRET)), threading.Event()
    thread = threading.Thread(target=_serve, args=(server, stop, answer_pushes), daemon=True)
    thread.start()
    try:
        params, infos = describe(model, opt)
        chan = ClientChannel(Codec(SECRET), server.address, "server 0", timeout=timeout)
        ctx = SimpleNamespace(rank=0, world_size=1, timeout=timeout)
        shards = plan_shards(infos, 1).shards
        strategy = concord.ParameterServer(overlap=True)
        ps = OverlapPSOptimizer(opt, strategy, ctx, params, infos, shards, [chan])
        ps.register(None)
        ps.attach(model)
        yield model, ps
        ps.close()
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


@pytest.mark.timeout(60)
def test_a_server_that_stops_answering_gives_an_error_naming_it():
    with _in_process(answer_pushes=False, timeout=0.5) as (model, ps):
        x = torch.randn(3, 4)
        model(x).sum().backward()
        ps.step()  # returns: the push is sent, the reply is awaited by the next forward
        with pytest.raises(concord.PeerTimeoutError) as err:
            model(x)
        assert "server 0" in str(err.value) and "new parameters after a push" in str(err.value)


@pytest.mark.timeout(60)
def test_more_backward_passes_than_before_is_an_error_not_a_wrong_gradient():
    with _in_process(answer_pushes=True, timeout=10.0) as (model, ps):
        x = torch.randn(3, 4)
        model(x).sum().backward()
        ps.step()  # learns K = 1 (the first step pushes at step())
        model(x).sum().backward()  # pushes during this backward
        assert ps.early_pushes == 1
        with pytest.raises(concord.UsageError) as err:
            model(x).sum().backward()
        assert "backward pass 2 of step 1 came after this step's gradients were pushed" in str(
            err.value
        )
