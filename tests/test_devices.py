"""Which device a worker trains on, and the pieces that follow the model's device (no GPU
needed: the rule is a pure function; ``meta`` tensors stand in for a second device)."""

from __future__ import annotations

import pytest
import torch
from test_allreduce_api import ctx
from torch import nn

from concord.cli import main
from concord.comm.rendezvous import read_env, tasks_per_node
from concord.comm.runtime import backend_for, choose_device, host_gpus
from concord.errors import UsageError
from concord.launch.plan import LaunchConfig, plan
from concord.strategies.base import model_device
from concord.trainer import Trainer


@pytest.mark.parametrize(
    ("choice", "local_rank", "local_world", "gpus", "want"),
    [
        ("auto", 0, 1, 0, "cpu"),  # no GPU
        ("auto", 1, 2, 2, "cuda:1"),  # a GPU each
        ("auto", 2, 4, 8, "cuda:2"),
        ("auto", 0, 2, 1, "cpu"),  # two would share one GPU: nccl cannot
        ("cpu", 0, 1, 4, "cpu"),
        ("cuda", 3, 4, 4, "cuda:3"),
    ],
)
def test_a_gpu_of_its_own_or_the_cpu(choice, local_rank, local_world, gpus, want):
    assert choose_device(choice, local_rank, local_world, gpus) == torch.device(want)


@pytest.mark.parametrize(
    ("local_world", "gpus", "message"),
    [(1, 0, "torch sees no GPU"), (4, 2, r"4 workers on this host but 2 GPU\(s\).*-n 2")],
)
def test_cuda_without_a_gpu_per_worker_is_a_clear_error(local_world, gpus, message):
    with pytest.raises(UsageError, match=message):
        choose_device("cuda", 0, local_world, gpus)


def test_gloo_always_and_nccl_for_cuda_tensors():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "cpu:gloo,cuda:nccl"


def test_the_env_names_the_host_s_workers_and_the_device():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    c = read_env(env | {"CONCORD_DEVICE": "cpu"})
    assert (c.local_rank, c.local_world_size, c.device) == (1, 4, "cpu")
    assert read_env({"RANK": "0", "WORLD_SIZE": "3"}).local_world_size == 3  # unknown: all here
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "2"}
    assert (read_env(slurm).local_world_size, read_env(slurm).device) == (2, "auto")
    assert read_env({}).local_world_size == 1
    with pytest.raises(UsageError, match="CONCORD_DEVICE='gpu' is not one of auto, cpu, cuda"):
        read_env({"CONCORD_DEVICE": "gpu"})


def test_slurm_s_tasks_per_node_name_this_node_s_workers():
    job = {"SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_TASKS_PER_NODE": "2(x3),1"}
    assert [read_env(job | {"SLURM_NODEID": n}).local_world_size for n in "0123"] == [2, 2, 2, 1]
    step = job | {"SLURM_STEP_TASKS_PER_NODE": "4,3", "SLURM_NODEID": "1"}
    assert read_env(step).local_world_size == 3  # the step's layout before the job's
    assert read_env(step | {"SLURM_NTASKS_PER_NODE": "5"}).local_world_size == 5
    assert tasks_per_node("X", "8") == [8]
    for bad in ("2(x3", "2(3)", "x", "0", "2(x0)", "2,,1"):
        with pytest.raises(UsageError, match=r"SLURM_TASKS_PER_NODE=.* is not like '2\(x3\),1'"):
            read_env(job | {"SLURM_TASKS_PER_NODE": bad})
    with pytest.raises(UsageError, match="SLURM_NODEID=4 is outside SLURM_TASKS_PER_NODE"):
        read_env(job | {"SLURM_NODEID": "4"})


def test_the_launcher_passes_device_to_every_worker():
    config = LaunchConfig(program=("t.py",), workers=2, servers=1, device="cpu")
    specs = plan(config, 29512, "ab" * 32, 0, python="/usr/bin/python3")
    assert [read_env(s.env).device for s in specs] == ["cpu", "cpu", "cpu"]
    unset = plan(LaunchConfig(program=("t.py",)), 29512, "ab" * 32, 0, inherited={})
    assert "CONCORD_DEVICE" not in unset[0].env
    with pytest.raises(UsageError, match="--device must be one of auto, cpu, cuda, got 'tpu'"):
        LaunchConfig(program=("t.py",), device="tpu")


def test_the_trainer_moves_batches_to_the_model_s_device():
    x, y = torch.ones(2, 3), torch.zeros(2, dtype=torch.int64)
    on_meta = Trainer(nn.Linear(3, 2, device="meta"), None, nn.functional.cross_entropy, ctx())
    assert {t.device.type for t in on_meta._to_device(x, y)} == {"meta"}
    on_cpu = Trainer(nn.Linear(3, 2), None, nn.functional.cross_entropy, ctx())
    assert all(a is b for a, b in zip(on_cpu._to_device(x, y), (x, y)))  # no copy on the CPU


def test_a_model_must_be_on_one_device():
    mixed = [nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2, device="meta"))]
    with pytest.raises(UsageError, match=r"\['cpu', 'meta'\].*model.to\(ctx.device\)"):
        model_device(mixed)
    assert model_device(mixed[1:]) == torch.device("meta")
    assert model_device([]) == torch.device("cpu")


@pytest.mark.parametrize("command", ["train", "run"])
def test_launchers_refuse_cuda_without_a_gpu_per_worker_before_starting(command, capsys):
    workers = str(host_gpus() + 1)  # one worker too many on any host
    argv = ["train", "--workers", workers] if command == "train" else ["run", "-n", workers]
    argv += ["--device", "cuda"] + (["examples/torchrun_style.py"] if command == "run" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--device cuda (CONCORD_DEVICE)" in err and "GPU" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["train", "run"])
def test_launchers_check_the_concord_device_their_workers_inherit(command, capsys, monkeypatch):
    workers = str(host_gpus() + 1)
    argv = ["train", "--workers", workers] if command == "train" else ["run", "-n", workers]
    argv += ["examples/torchrun_style.py"] if command == "run" else []
    monkeypatch.setenv("CONCORD_DEVICE", "cuda")
    assert main(argv) == 2
    assert "--device cuda (CONCORD_DEVICE)" in capsys.readouterr().err
    monkeypatch.setenv("CONCORD_DEVICE", "gpu")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "CONCORD_DEVICE='gpu' is not one of auto, cpu, cuda" in err
    assert len(err.splitlines()) == 1
