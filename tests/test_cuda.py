"""GPU paths, run only where torch sees a CUDA GPU (skipped elsewhere, as in CI).

A worker with a GPU of its own trains on it (nccl for CUDA tensors, gloo for the CPU ones the
Trainer reduces); workers that would share a GPU train on the CPU unless told otherwise; and a
model a user put on the GPU trains correctly under AllReduce (nccl, and gloo's CUDA path) and
a parameter server (host copies on the wire).

Tolerance: 1e-5 relative (atol 1e-6), the bar of the CPU equivalence tests: the workers'
float32 gradients are averaged in another order than one process's mean over the global batch.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from multiproc import run_workers
from ps_harness import run_ps_job
from test_allreduce_api import ctx as one_process_ctx
from test_pipeline import CONFIGS, _check_stage, _pipelined
from test_pipeline import _reference as _unsplit
from test_ps import BranchNet, _optimizer, _train

from concord.models import build_model
from concord.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 4
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _params(model) -> list[torch.Tensor]:
    """The parameters on the CPU (with ``overlap=True``: once the last reply was loaded)."""
    return [p.detach().cpu().clone() for p in model.parameters()]


def _reference(opt_name: str) -> list[torch.Tensor]:
    """One process on the GPU: the whole global batch each step."""
    torch.manual_seed(0)
    model = BranchNet().cuda()
    _train(model, _optimizer(opt_name, model), 0, 1, steps=STEPS)
    return _params(model)


def _close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _allreduce_worker(engine: str, device: str | None):
    import concord

    ctx = concord.init(timeout=60)
    torch.manual_seed(0)
    model = BranchNet().to(device or ctx.device)
    opt = _optimizer("sgd", model)
    strategy = concord.AllReduce(engine=engine)
    if ctx.world_size == 1:  # world 1 skips reducing: build the reducer to drive nccl anyway
        from concord.strategies.allreduce import AllReduceModel, AllReduceOptimizer

        wrapped = AllReduceModel(model, strategy._reducer(model, ctx))
        model, opt = wrapped, AllReduceOptimizer(opt, wrapped, None)
    else:
        model, opt = concord.distribute(model, opt, strategy)
    _train(model, opt, ctx.rank, ctx.world_size, steps=STEPS)
    return str(ctx.device), ctx.backend, _params(model)


@pytest.mark.timeout(120)
def test_a_worker_with_a_gpu_of_its_own_trains_there_through_nccl():
    (result,) = run_workers(_allreduce_worker, 1, args=("torch", None), timeout=90)
    device, backend, params = result
    assert (device, backend) == ("cuda:0", "cpu:gloo,cuda:nccl")
    _close(params, _reference("sgd"))


@pytest.mark.timeout(120)
def test_workers_sharing_a_gpu_train_on_the_cpu_or_refuse_cuda():
    if GPUS >= 2:
        pytest.skip("every worker of two has a GPU here")
    env = {"LOCAL_WORLD_SIZE": "2"}
    results = run_workers(_allreduce_worker, 2, args=("auto", None), env=env, timeout=90)
    assert {(r[0], r[1]) for r in results} == {("cpu", "gloo")}
    with pytest.raises(AssertionError, match="nccl needs a GPU per worker"):
        run_workers(_allreduce_worker, 2, ("auto", None), env=env | {"CONCORD_DEVICE": "cuda"})


@pytest.mark.timeout(120)
@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")
def test_two_workers_with_a_gpu_each_reduce_through_nccl():
    env = {"LOCAL_WORLD_SIZE": "2"}
    results = run_workers(_allreduce_worker, 2, args=("auto", None), env=env, timeout=90)
    assert [(r[0], r[1]) for r in results] == [
        ("cuda:0", "cpu:gloo,cuda:nccl"),
        ("cuda:1", "cpu:gloo,cuda:nccl"),
    ]
    for _, _, params in results:
        _close(params, _reference("sgd"))


@pytest.mark.timeout(120)
@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")
def test_pipeline_stages_on_gpus_of_their_own_match_the_unsplit_model():
    """Activations and their gradients go through nccl (the test_pipeline cases, on GPUs)."""
    env = {"LOCAL_WORLD_SIZE": "2"}
    per_rank = run_workers(_pipelined, 2, args=(2, 10, CONFIGS, 1, True), env=env, timeout=100)
    ref = _unsplit(10)
    for c in range(len(CONFIGS)):
        for rank in range(2):
            assert per_rank[rank][c]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
            _check_stage(per_rank[rank][c], ref)


@pytest.mark.timeout(120)
def test_allreduce_of_a_model_the_user_put_on_the_gpu_equals_one_process():
    """Two workers on one GPU: gloo reduces the CUDA buckets (the engine follows the model)."""
    results = run_workers(_allreduce_worker, 2, args=("auto", "cuda:0"), timeout=90)
    for _, _, params in results:
        _close(params, _reference("sgd"))


def _ps_worker(overlap: bool):
    import concord

    ctx = concord.init(timeout=60)
    torch.manual_seed(0 if ctx.rank == 0 else ctx.rank + 7)  # only worker 0's init counts
    model = BranchNet().cuda()
    opt = _optimizer("adam", model)
    model, opt = concord.distribute(model, opt, concord.ParameterServer(overlap=overlap))
    _train(model, opt, ctx.rank, ctx.world_size, steps=STEPS)
    state = opt.state_dict()["state"]
    opt.close()  # with overlap=True: loads the last step's parameters, still on their way
    return _params(model), {k: v["exp_avg"].device.type for k, v in state.items()}


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("servers", "overlap"), [(1, False), (2, False), (2, True)])
def test_sync_ps_of_a_model_on_the_gpu_equals_one_process(servers, overlap):
    job = run_ps_job(_ps_worker, 2, servers, args=(overlap,))
    for params, state_devices in job.results:
        _close(params, _reference("adam"))
        assert set(state_devices.values()) == {"cpu"}  # gathered from the servers


@pytest.mark.timeout(240)
def test_concord_train_on_the_gpu(tmp_path):
    cli = [sys.executable, "-m", "concord.cli", "train", "--epochs", "1", "--workers", "1"]
    done = subprocess.run(
        [*cli, "--device", "cuda", "--out", str(tmp_path), "--min-accuracy", "0.9"],
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line)["test_accuracy"] >= 0.9
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {t.device.type for t in saved["model"].values()} == {"cuda"}
    model = build_model("mlp")  # the GPU run's checkpoint resumes on the CPU
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = Trainer(model, opt, torch.nn.functional.cross_entropy, one_process_ctx())
    assert trainer.resume(tmp_path / "checkpoint.pt") == 1
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved["model"][name].cpu(), rtol=0, atol=0)


def _bags_step(step: int, device) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    gen = torch.Generator().manual_seed(300 + step)
    ids, y = torch.randint(0, 50, (16, 4), generator=gen), torch.randint(0, 3, (16,), generator=gen)
    return ids.to(device), y.to(device)


def _bag_model(device):  # noqa: ANN001
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.EmbeddingBag(50, 8, sparse=True), torch.nn.Linear(8, 3))
    return model.to(device)


def _sparse_worker():
    """A sparse embedding on the GPU through the torch engine (nccl has no sparse all_reduce:
    a mask of the touched rows, then their values); whether .grad stayed a sparse CUDA tensor."""
    import concord
    from concord.strategies.allreduce import AllReduceModel, AllReduceOptimizer

    ctx = concord.init(timeout=60)
    model = _bag_model(ctx.device)
    wrapped = AllReduceModel(model, concord.AllReduce(engine="torch")._reducer(model, ctx))
    opt = AllReduceOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), wrapped, None)
    layouts = set()
    for step in range(STEPS):
        ids, y = _bags_step(step, ctx.device)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(wrapped(ids), y).backward()
        grad = model[0].weight.grad
        layouts.add((grad.is_sparse, grad.device.type))
        opt.step()
    return str(ctx.device), layouts, _params(model)


@pytest.mark.timeout(120)
def test_sparse_embedding_on_the_gpu_reduces_its_rows_through_nccl():
    (result,) = run_workers(_sparse_worker, 1, timeout=90)
    device, layouts, params = result
    model = _bag_model("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        ids, y = _bags_step(step, "cuda")
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(ids), y).backward()
        opt.step()
    assert device == "cuda:0" and layouts == {(True, "cuda")}
    _close(params, _params(model))
