"""Pipeline in real processes: gradients equal the unsplit model's, hybrid D x P, clipping,
a sparse embedding stage, failures.

Tolerance: float32, micro-batch losses are summed in a different order than one mean over
the batch, so gradients and parameters agree to 1e-5 relative (atol 1e-7), not bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing as mp
import os
import time

import pytest
import torch
import torch.nn.functional as F
from multiproc import job_env, run_workers
from torch import nn

# (schedule, micro-batches, split): split None balances parameter counts
CONFIGS = [(schedule, m, None) for schedule in ("gpipe", "1f1b") for m in (1, 4)]
TOL = {"rtol": 1e-5, "atol": 1e-7}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
        nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3),
    )  # fmt: skip


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _reference(n: int) -> dict:
    """The unsplit model: loss, gradients, parameters after one SGD step, eval output."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _batch(n, 1)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    with torch.no_grad():
        out = model(x)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "params": params, "out": out}


def _pipelined(
    stages: int, n: int, configs: list, replicas: int = 1, on_device: bool = False
) -> list[dict]:
    """One stage's view of one step for every (schedule, M, split) in ``configs`` (the model
    on ``ctx.device`` with ``on_device``; results on the CPU)."""
    import concord

    ctx = concord.init(timeout=30)
    device = ctx.device if on_device else torch.device("cpu")
    results = []
    for schedule, m, split in configs:
        model = _model().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        strategy = concord.Pipeline(stages, m, schedule, split=split, replicas=replicas)
        stage, sopt = strategy.distribute(model, opt, ctx)
        shard = strategy.data_shard(ctx)
        x, y = _batch(n, 1)
        x, y = x[shard.rank :: shard.world].to(device), y[shard.rank :: shard.world].to(device)
        sopt.zero_grad()
        loss = stage.train_batch(x, y, F.cross_entropy)
        grads = {k: p.grad.cpu().clone() for k, p in stage.named_parameters()}
        sopt.step()
        stage.eval()
        with torch.no_grad():
            out = stage(x).cpu()
        params = {k: p.detach().cpu().clone() for k, p in stage.named_parameters()}
        stats = stage.last_stats
        results.append(
            {"loss": loss.item(), "grads": grads, "params": params, "out": out,
             "peak_in_flight": stats.peak_in_flight, "microbatches": stats.microbatches}
        )  # fmt: skip
    return results


def _check_stage(got: dict, ref: dict, with_grads: bool = True) -> None:
    for key, value in got["params"].items():
        if with_grads:
            torch.testing.assert_close(got["grads"][key], ref["grads"][key], **TOL)
        torch.testing.assert_close(value, ref["params"][key], **TOL)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stages", [2, 3])
def test_gradients_match_unsplit_model(stages):
    n = 10  # M=4 cuts 10 samples into 3, 3, 2, 2: losses are weighted by size
    ref = _reference(n)
    # P=3 also runs a stage that holds no parameters (layer 1 alone is a Tanh)
    configs = CONFIGS + ([("1f1b", 4, [1, 2])] if stages == 3 else [])
    per_rank = run_workers(_pipelined, stages, args=(stages, n, configs), timeout=100)
    for c, (schedule, m, split) in enumerate(configs):
        seen = set()
        for rank in range(stages):
            got = per_rank[rank][c]
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), (schedule, m, rank)
            _check_stage(got, ref)
            torch.testing.assert_close(got["out"], ref["out"], **TOL)
            assert got["microbatches"] == m
            # 1F1B: stage s holds at most P - s micro-batches; GPipe holds all M
            bound = min(m, stages - rank) if schedule == "1f1b" else m
            assert got["peak_in_flight"] == bound
            assert got["params"] or split == [1, 2]
            seen |= set(got["params"])
        assert seen == set(ref["params"])  # the stages together hold the whole model


@pytest.mark.timeout(120)
def test_hybrid_two_replicas_of_two_stages_match_unsplit_model():
    n = 12  # each replica takes 6 samples (rank layout: rank = replica * 2 + stage)
    ref = _reference(n)
    configs = [("1f1b", 4, "time"), ("gpipe", 2, None)]  # "time": rank 0 measures, broadcasts
    per_rank = run_workers(_pipelined, 4, args=(2, n, configs, 2), timeout=100)
    for c in range(len(configs)):
        losses = [per_rank[r][c]["loss"] for r in range(4)]
        assert losses[0] == losses[1] and losses[2] == losses[3]  # shared within a replica
        assert (losses[0] + losses[2]) / 2 == pytest.approx(ref["loss"], rel=1e-5)
        for rank in range(4):
            _check_stage(per_rank[rank][c], ref, with_grads=False)
        for stage in range(2):  # the same stage of both replicas agrees bit for bit
            a, b = per_rank[stage][c]["params"], per_rank[2 + stage][c]["params"]
            assert all(torch.equal(a[k], b[k]) for k in a)


CLIP = 0.44  # the whole gradient's norm is 0.459, 0.409, 0.507, 0.463, 0.424: 3 of 5 clip


def _clipped_reference(n: int, steps: int) -> tuple[dict, list[float]]:
    """The unsplit model trained ``steps`` steps with ``clip_grad_norm_(CLIP)``: its parameters
    and the norm ``clip_grad_norm_`` returned at each step."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    norms = []
    for step in range(steps):
        x, y = _batch(n, 10 + step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
    return {k: p.detach().clone() for k, p in model.named_parameters()}, norms


BAG_CLIP = 0.6  # the bag model's norms (clipped): 0.479, 0.768, 0.558, 0.529, 0.809: 2 of 5 clip


def _bag_model() -> nn.Sequential:
    """An ``nn.EmbeddingBag(sparse=True)`` first layer: the first stage's gradient is sparse."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.EmbeddingBag(30, 8, mode="mean", sparse=True),
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3),
    )  # fmt: skip


def _bags(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30, (n, 3), generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _sparse_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """clip_grad_norm_'s total norm, which torch does not compute over sparse gradients."""
    dense = [g.coalesce().values() if g.is_sparse else g for g in grads]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in dense]))


def _bag_reference(n: int, steps: int) -> tuple[dict, list[float]]:
    model = _bag_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    norms = []
    for step in range(steps):
        x, y = _bags(n, 20 + step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad for p in model.parameters()]
        norms.append(float(_sparse_norm(grads)))
        for g in grads:  # as clip_grad_norm_ scales
            g.mul_(min(1.0, BAG_CLIP / (norms[-1] + 1e-6)))
        opt.step()
    return {k: p.detach().clone() for k, p in model.named_parameters()}, norms


def _clipped_pipeline(stages: int, replicas: int, n: int, steps: int, runs: list) -> list:
    """For each ``(config, bags)`` of ``runs``: this stage's parameters after ``steps`` steps of
    ``Pipeline(max_grad_norm=CLIP)``, the norm its optimizer saw at each step, how many steps
    it clipped, and the layouts (sparse or not) of its matrices' gradients. ``bags``: the bag
    model, its batches and BAG_CLIP."""
    import concord

    ctx = concord.init(timeout=30)
    results = []
    for (schedule, m, split), bags in runs:
        model = _bag_model() if bags else _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        if bags:  # the same update from two optimizers (a list, as for SparseAdam + Adam)
            table = list(model[0].parameters())
            rest = [p for layer in model[1:] for p in layer.parameters()]
            opt = [torch.optim.SGD(ps, lr=0.5, momentum=0.9) for ps in (table, rest)]
            opt = concord.MultiOptimizer(*opt)
        clip = BAG_CLIP if bags else CLIP
        strategy = concord.Pipeline(stages, m, schedule, split, replicas, max_grad_norm=clip)
        stage, sopt = strategy.distribute(model, opt, ctx)
        shard = strategy.data_shard(ctx)
        norms, layouts = [], set()
        for step in range(steps):
            x, y = _bags(n, 20 + step) if bags else _batch(n, 10 + step)
            sopt.zero_grad()
            stage.train_batch(
                x[shard.rank :: shard.world], y[shard.rank :: shard.world], F.cross_entropy
            )
            sopt.step()
            norms.append(sopt.last_grad_norm)
            layouts |= {p.grad.is_sparse for p in stage.parameters() if p.dim() == 2}
        params = {k: p.detach().clone() for k, p in stage.named_parameters()}
        results.append(
            {"params": params, "norms": norms, "clipped": sopt.clipped, "layouts": layouts}
        )
    return results


CLIP_STEPS = 5
# one spawn of 2 replicas x 2 stages runs the dense model's clip and the bag model's
TWO_BY_TWO = [(("gpipe", 2, None), False), (("gpipe", 2, [1]), True)]


@functools.cache
def _clip_job(stages: int, replicas: int) -> list:
    runs = TWO_BY_TWO if (stages, replicas) == (2, 2) else [(("1f1b", 4, [1, 2]), False)]
    args = (stages, replicas, 12, CLIP_STEPS, runs)
    return run_workers(_clipped_pipeline, stages * replicas, args=args, timeout=100)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stages, replicas", [(3, 1), (2, 2)])  # P=3: [1, 2], a weightless stage
def test_max_grad_norm_clips_as_one_process_clips_the_whole_model(stages, replicas):
    ref_params, ref_norms = _clipped_reference(12, CLIP_STEPS)
    seen = set()
    for per_run in _clip_job(stages, replicas):
        got = per_run[0]
        # every stage of every replica saw the whole model's norm and clipped the same 3 steps
        assert got["norms"] == pytest.approx(ref_norms, rel=1e-5)
        assert got["clipped"] == sum(norm > CLIP for norm in ref_norms) == 3
        for key, value in got["params"].items():
            torch.testing.assert_close(value, ref_params[key], **TOL)
        seen |= set(got["params"])
    assert seen == set(ref_params)


@pytest.mark.timeout(120)
def test_sparse_embedding_stage_averages_and_clips_as_one_process():
    """Stage 0 holds an EmbeddingBag(sparse=True): the replicas average its touched rows (gloo's
    sparse all_reduce on the CPU) and its gradient stays sparse; the clip's norm counts its
    values as clip_grad_norm_ would count the dense gradient. The stages step two optimizers
    (one for the table, one for the rest: a MultiOptimizer, each stage keeping its share)."""
    ref_params, ref_norms = _bag_reference(12, CLIP_STEPS)
    assert sum(norm > BAG_CLIP for norm in ref_norms) == 2
    for rank, per_run in enumerate(_clip_job(2, 2)):
        got = per_run[1]
        assert got["norms"] == pytest.approx(ref_norms, rel=1e-5)
        assert got["layouts"] == {rank % 2 == 0}  # stage 0: the embedding, sparse
        for key, value in got["params"].items():
            torch.testing.assert_close(value, ref_params[key], **TOL)


class _Bomb(nn.Module):
    """Identity, except that the process dies (``die``) or stalls (``stall``) on first use."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "die":
            os._exit(3)
        if self.mode == "stall":
            time.sleep(8)
        return x


def _faulty(mode: str, timeout: float) -> str:
    import concord

    ctx = concord.init(timeout=30)
    ctx = dataclasses.replace(ctx, timeout=timeout)
    model = nn.Sequential(
        nn.Linear(6, 8), _Bomb(mode if ctx.rank == 1 else "none"), nn.Linear(8, 8),
        nn.Linear(8, 3),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stage, opt = concord.Pipeline(3, 4, "gpipe", split=[1, 3]).distribute(model, opt, ctx)
    x, y = _batch(8, 1)
    try:
        stage.train_batch(x, y, F.cross_entropy)
    except concord.PeerTimeoutError as exc:
        return str(exc)
    return "no error"


def _lone_rank(fn, rank: int, env: dict, args: tuple) -> None:  # noqa: ANN001 - child
    os.environ.update(env | {"RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    fn(*args)


@pytest.mark.timeout(120)
def test_dead_stage_gives_clear_error_on_its_neighbours():
    env = job_env(3)
    doomed = mp.get_context("spawn").Process(
        target=_lone_rank, args=(_faulty, 1, env, ("die", 20.0))
    )
    doomed.start()
    try:
        errors = run_workers(_faulty, 3, args=("die", 20.0), ranks=[0, 2], env=env, timeout=90)
    finally:
        doomed.join(timeout=30)
        if doomed.is_alive():
            doomed.kill()
            doomed.join()
    assert doomed.exitcode == 3
    for rank, message in zip([0, 2], errors):
        assert f"pipeline stage {rank} (rank {rank})" in message
        assert "lost stage 1 (rank 1)" in message, message


@pytest.mark.timeout(120)
def test_stalled_stage_times_out_with_its_name():
    errors = run_workers(_faulty, 3, args=("stall", 3.0), timeout=90)
    # rank 1 itself wakes up after its neighbours gave up: whatever it reports is fine
    for rank in (0, 2):
        assert "timed out after 3s" in errors[rank], errors[rank]
        assert "stage 1 (rank 1)" in errors[rank]
