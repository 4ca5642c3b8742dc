"""Parameter servers in real processes: S servers (``python -m concord.strategies.ps.server``)
next to N spawned workers on 127.0.0.1.

Tolerance of the sync equivalence: 1e-5 relative (atol 1e-6). The servers average the workers'
float32 gradients (means over b samples each) in arrival order, while one process takes the
mean over N*b samples; the results differ only by float32 rounding of the sums.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from ps_harness import run_ps_job
from torch import nn
from torch.nn import functional as F

STEPS = 6
GLOBAL_BATCH = 16


class BranchNet(nn.Module):
    """A frozen parameter and a branch used only on every third step."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)
        self.branch = nn.Linear(16, 3)
        self.scale = nn.Parameter(torch.full((3,), 0.5), requires_grad=False)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        out = self.fc2(h) * self.scale
        return out + self.branch(h) if use_branch else out


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01
        )
    return torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=gen), torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)


def _train(model, opt, rank, world, steps=STEPS, workers=None, after_step=None) -> None:
    """Each worker takes its slice of the global batch; ``workers`` lists the shards counted."""
    for step in range(steps):
        x, y = _batch(step)
        if workers is not None:  # reference run over only the listed workers' slices
            idx = torch.cat([torch.arange(w, GLOBAL_BATCH, world) for w in workers])
        else:
            idx = torch.arange(rank, GLOBAL_BATCH, world)
        opt.zero_grad()
        F.cross_entropy(model(x[idx], step % 3 == 0), y[idx]).backward()
        opt.step()
        if after_step is not None:
            after_step(step)


def _reference(opt_name: str, steps: int = STEPS, world: int = 1, workers=None) -> list:
    torch.manual_seed(0)
    model = BranchNet()
    opt = _optimizer(opt_name, model)
    _train(model, opt, 0, world, steps, workers=workers if workers else list(range(world)))
    return [p.detach().clone() for p in model.parameters()]


def _sync_worker(opt_name: str, strategy_kwargs: dict, late_rank: int | None = None):
    import concord

    ctx = concord.init(timeout=60)
    torch.manual_seed(0 if ctx.rank == 0 else ctx.rank + 7)  # only worker 0's init counts
    model = BranchNet()
    opt = _optimizer(opt_name, model)
    model, opt = concord.distribute(model, opt, concord.ParameterServer(**strategy_kwargs))
    after_step = None
    if late_rank is not None and ctx.rank == late_rank:
        opt.step = _late(opt)
    elif late_rank is not None:  # wait until the late worker's push of this step was dropped
        after_step = lambda step: _wait(opt, lambda s: s["dropped"] > step)  # noqa: E731
    _train(model, opt, ctx.rank, ctx.world_size, after_step=after_step)
    stats = opt.server_stats()
    opt.close()
    return [p.detach().clone() for p in model.parameters()], stats


def _wait(opt, done, limit: float = 30.0) -> None:
    """Poll the servers' stats until ``done(stats)`` holds on every server."""
    deadline = time.monotonic() + limit
    while not all(done(s) for s in opt.server_stats()):
        assert time.monotonic() < deadline, "the servers never reached the awaited state"
        time.sleep(0.01)


def _late(opt):
    """A step that pushes only after the servers finished this step without us."""
    push = opt.step

    def step():
        _wait(opt, lambda s: s["version"] > opt.versions[0])
        push()

    return step


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("workers", "servers", "opt_name"),
    [(2, 1, "sgd"), (2, 2, "adam"), (4, 2, "sgd"), (4, 1, "adam")],
)
def test_sync_ps_equals_one_process_on_the_global_batch(workers, servers, opt_name):
    job = run_ps_job(_sync_worker, workers, servers, args=(opt_name, {"mode": "sync"}))
    reference = _reference(opt_name)
    for params, stats in job.results:
        for got, want in zip(params, reference):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert [s["version"] for s in stats] == [STEPS] * servers
    stats = job.results[0][1]
    assert sum(s["pushes"] for s in stats) == workers * STEPS * servers
    assert all(s["dropped"] == 0 and s["staleness"] == {"0": workers * STEPS} for s in stats)
    assert job.server_codes == [0] * servers  # every worker said goodbye


@pytest.mark.timeout(120)
def test_backup_worker_drops_exactly_the_late_gradients():
    kwargs = {"mode": "sync", "backup_workers": 1}
    job = run_ps_job(_sync_worker, 3, 1, args=("sgd", kwargs, 2))
    stats = job.results[0][1][0]
    # worker 2 pushes every step only after workers 0 and 1 completed it: all 6 dropped
    assert stats["dropped"] == STEPS
    assert stats["dropped_log"] == [[2, s] for s in range(STEPS)]
    assert stats["pushes"] == 3 * STEPS and stats["version"] == STEPS
    # and the model is what one process gets from workers 0 and 1's slices alone
    reference = _reference("sgd", world=3, workers=[0, 1])
    for params, _ in job.results:
        for got, want in zip(params, reference):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
