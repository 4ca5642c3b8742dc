"""Process start-up: ``init()`` builds the worker process group, ``shutdown()`` undoes it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from concord.comm.rendezvous import (
    EnvContract,
    arrive,
    attempt_prefix,
    connect_store,
    env_device,
    read_env,
)
from concord.comm.sched import apply_worker_sched, worker_sched
from concord.errors import ConcordError, UsageError

log = logging.getLogger("concord")

#: seconds any wait may last before it fails with an error naming the peer;
#: ``concord run --timeout`` sets CONCORD_TIMEOUT for every process it starts
DEFAULT_TIMEOUT = float(os.environ.get("CONCORD_TIMEOUT", "300"))


@dataclass(frozen=True)
class Context:
    """Who this process is in the job. ``rank`` and ``world_size`` count workers only."""

    rank: int
    world_size: int
    local_rank: int
    role: str
    servers: int
    backend: str
    device: torch.device
    timeout: float
    master_addr: str
    master_port: int
    attempt: int = 0
    secret: bytes = field(default=b"", repr=False)
    store: Any = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        """True on the worker that logs, prints progress and writes files (rank 0)."""
        return self.rank == 0 and self.role == "worker"

    @property
    def store_prefix(self) -> str:
        """Prefix for this attempt's keys in the rendezvous store."""
        return f"concord/{self.attempt}/"


_current: Context | None = None


def current() -> Context | None:
    """The context made by the last ``init()``, or None."""
    return _current


def choose_device(choice: str, local_rank: int, local_world: int, gpus: int) -> torch.device:
    """The device a worker trains on: a GPU of its own when every worker on its host has one.

    ``choice`` is CONCORD_DEVICE: "cpu", "cuda" (an error unless each of the host's
    ``local_world`` workers can have one of its ``gpus``) or "auto" (the GPU when it can,
    else the CPU). nccl needs one GPU per process, so workers never share one.
    """
    if choice == "cpu" or (choice == "auto" and (gpus == 0 or local_world > gpus)):
        return torch.device("cpu")
    if gpus == 0:
        raise UsageError("--device cuda (CONCORD_DEVICE), but torch sees no GPU on this host")
    if local_world > gpus:
        raise UsageError(
            f"--device cuda (CONCORD_DEVICE): {local_world} workers on this host but {gpus} "
            f"GPU(s); nccl needs a GPU per worker: start at most {gpus} workers per host "
            f"(-n {gpus}), or train on the CPU (--device cpu)"
        )
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    """The process group's backend: gloo for CPU tensors, and nccl for CUDA ones on a GPU."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def host_gpus() -> int:
    """The GPUs torch sees on this host."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device_choice(choice: str | None, local_workers: int) -> None:
    """Raise the UsageError every worker would raise for ``choice`` before they start (the
    launchers' early check of ``--device cuda``). Without ``choice`` the workers inherit this
    process's ``CONCORD_DEVICE``, so that is checked."""
    if choice is None:
        choice = env_device(os.environ)
    if choice == "cuda":
        choose_device(choice, 0, local_workers, host_gpus())


def _device(contract: EnvContract) -> torch.device:
    if contract.role != "worker":
        return torch.device("cpu")  # servers and data servers keep their tensors in host memory
    gpus = host_gpus()
    device = choose_device(contract.device, contract.local_rank, contract.local_world_size, gpus)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif gpus and contract.device == "auto" and contract.local_rank == 0:
        log.warning(
            "concord: %d workers on this host share %d GPU(s); they train on the CPU "
            "(one GPU per worker: -n %d)",
            contract.local_world_size,
            gpus,
            gpus,
        )
    return device


def init(timeout: float | None = None, backend: str | None = None) -> Context:
    """Join the job described by the environment and return this process's Context.

    Creates the worker process group with a finite timeout: gloo, plus nccl for CUDA tensors
    when every worker on this host has a GPU of its own (``ctx.device``; CONCORD_DEVICE or
    ``concord run --device`` choose). A worker that never arrives ends this call within
    ``timeout`` seconds with an error that lists the missing ranks. Calling it again returns
    the existing context. A worker takes the scheduling policy ``CONCORD_WORKER_SCHED`` names
    (:mod:`concord.comm.sched`; ``concord run`` sets it).
    """
    global _current
    if _current is not None:
        return _current
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    if timeout <= 0:
        raise UsageError(f"timeout must be positive, got {timeout}")
    contract = read_env()
    if contract.role == "worker":
        apply_worker_sched(worker_sched())
    device = _device(contract)
    backend = backend or backend_for(device)
    store = _join(contract, backend, timeout)
    _current = Context(
        rank=contract.rank,
        world_size=contract.world_size,
        local_rank=contract.local_rank,
        role=contract.role,
        servers=contract.servers,
        backend=backend,
        device=device,
        timeout=timeout,
        master_addr=contract.master_addr,
        master_port=contract.master_port,
        attempt=contract.attempt,
        secret=contract.secret,
        store=store,
    )
    return _current


def _join(contract: EnvContract, backend: str, timeout: float) -> dist.Store:
    if contract.role != "worker":
        return connect_store(contract, timeout, host=False)
    if dist.is_initialized():
        raise ConcordError("torch.distributed is already initialized; call concord.init() once")
    if contract.single:
        store: dist.Store = dist.HashStore()
    else:
        store = connect_store(contract, timeout)
        arrive(
            store, attempt_prefix(contract), "worker", contract.rank, contract.world_size, timeout
        )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(attempt_prefix(contract) + "pg", store),
        rank=contract.rank,
        world_size=contract.world_size,
        timeout=timedelta(seconds=timeout),
    )
    return store


def shutdown() -> None:
    """Tear down the process group made by ``init()`` (safe to call twice)."""
    global _current
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - shutting down must not raise twice
            log.debug("destroy_process_group failed: %s", exc)
    _current = None
