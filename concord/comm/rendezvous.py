"""The env contract (torchrun's names plus CONCORD_*) and the rendezvous store.

Workers read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``,
``LOCAL_WORLD_SIZE``, ``CONCORD_ROLE``, ``CONCORD_SERVERS``, ``CONCORD_SECRET`` and
``CONCORD_DEVICE``. Under Slurm, ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and
``SLURM_NTASKS_PER_NODE`` stand in for torchrun's names (without the last, this node's entry,
``SLURM_NODEID``, of ``SLURM_STEP_TASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE``, whose form is
``2(x3),1``: two tasks on each of three nodes, then one). No env at all means a single
process (world 1). For servers, ``RANK`` is the server index and ``WORLD_SIZE`` the
number of workers.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from concord.errors import PeerTimeoutError, UsageError

ROLES = ("worker", "server", "data")
DEVICES = ("auto", "cpu", "cuda")
AGENT_STORE_VAR = "TORCHELASTIC_USE_AGENT_STORE"


@dataclass(frozen=True)
class EnvContract:
    """What a process learns from its environment about the job it belongs to."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    role: str = "worker"
    servers: int = 0
    secret: bytes = field(default=b"", repr=False)
    attempt: int = 0
    agent_store: bool = False
    local_world_size: int = 1
    device: str = "auto"

    @property
    def single(self) -> bool:
        """True when this is a lone worker with no rendezvous to make."""
        return self.world_size == 1 and self.servers == 0 and self.role == "worker"


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise UsageError(f"environment variable {name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"environment variable {name}={raw!r} is not an integer") from None


def read_env(env: Mapping[str, str] | None = None) -> EnvContract:
    """Read the env contract; Slurm's variables stand in when RANK is absent."""
    env = os.environ if env is None else env
    if "RANK" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE", 1)
        local = _int(env, "LOCAL_RANK", rank)
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
    elif "SLURM_PROCID" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS", 1)
        local = _int(env, "SLURM_LOCALID", 0)
        local_world = _slurm_local_world(env, world)
    else:
        rank, world, local, local_world = 0, 1, 0, 1
    role = env.get("CONCORD_ROLE", "worker")
    if role not in ROLES:
        raise UsageError(f"CONCORD_ROLE={role!r} is not one of {', '.join(ROLES)}")
    if world < 1 or not 0 <= rank < max(world, 1) and role == "worker":
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}")
    device = env_device(env)
    port = _int(env, "MASTER_PORT", 29500)
    secret = env.get("CONCORD_SECRET", "")
    return EnvContract(
        rank=rank,
        world_size=world,
        local_rank=local,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=port,
        role=role,
        servers=_int(env, "CONCORD_SERVERS", 0),
        secret=bytes.fromhex(secret) if _is_hex(secret) else secret.encode(),
        attempt=_int(env, "CONCORD_ATTEMPT", _int(env, "TORCHELASTIC_RESTART_COUNT", 0)),
        agent_store=env.get(AGENT_STORE_VAR, "") == "True",
        local_world_size=local_world,
        device=device,
    )


def env_device(env: Mapping[str, str]) -> str:
    """``CONCORD_DEVICE`` (``auto`` when unset or empty), checked."""
    device = env.get("CONCORD_DEVICE", "") or "auto"
    if device not in DEVICES:
        raise UsageError(f"CONCORD_DEVICE={device!r} is not one of {', '.join(DEVICES)}")
    return device


def _slurm_local_world(env: Mapping[str, str], world: int) -> int:
    """Tasks on this node under Slurm: ``SLURM_NTASKS_PER_NODE``, else this node's entry in
    the step's (or the job's) tasks per node, else ``world`` (all on this node)."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _int(env, "SLURM_NTASKS_PER_NODE")
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(name):
            counts = tasks_per_node(name, env[name])
            node = _int(env, "SLURM_NODEID", 0)
            if not 0 <= node < len(counts):
                raise UsageError(f"SLURM_NODEID={node} is outside {name}={env[name]!r}")
            return counts[node]
    return world


def tasks_per_node(name: str, value: str) -> list[int]:
    """Slurm's compressed tasks per node, one count per node: ``"2(x3),1"`` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for entry in value.split(","):
        count, _, repeat = entry.partition("(x")
        try:
            n, times = int(count), int(repeat.removesuffix(")")) if repeat else 1
        except ValueError:
            n = times = 0
        if n < 1 or times < 1 or (repeat and not repeat.endswith(")")):
            raise UsageError(f"environment variable {name}={value!r} is not like '2(x3),1'")
        counts += [n] * times
    return counts


def _is_hex(text: str) -> bool:
    return len(text) >= 2 and len(text) % 2 == 0 and all(c in "0123456789abcdef" for c in text)


def new_secret() -> str:
    """A fresh random job secret, hex encoded (32 bytes)."""
    return secrets.token_hex(32)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def connect_store(contract: EnvContract, timeout: float, host: bool | None = None) -> dist.Store:
    """Connect to the job's TCPStore (rank-0 worker hosts it unless the launcher does)."""
    if host is None:
        host = contract.role == "worker" and contract.rank == 0 and not contract.agent_store
    try:
        return dist.TCPStore(
            contract.master_addr,
            contract.master_port,
            is_master=host,
            timeout=timedelta(seconds=timeout),
            wait_for_workers=False,
            use_libuv=True,
        )
    except (RuntimeError, TimeoutError) as exc:
        where = f"{contract.master_addr}:{contract.master_port}"
        if host:
            raise UsageError(f"cannot host the rendezvous store on {where}: {exc}") from None
        raise PeerTimeoutError(
            f"{contract.role} {contract.rank}: could not reach the rendezvous store at {where} "
            f"within {timeout:g}s; is rank 0 (or the launcher) running, and do MASTER_ADDR/"
            f"MASTER_PORT match on every process? ({exc})"
        ) from None


def attempt_prefix(contract: EnvContract) -> str:
    """Store key prefix of this launch attempt (restarts must not see stale keys)."""
    return f"concord/{contract.attempt}/"


def arrive(store: dist.Store, prefix: str, group: str, index: int, size: int, timeout: float):
    """Barrier on the store: wait until all ``size`` members of ``group`` arrived.

    On timeout the error lists the members that never arrived.
    """
    store.set(f"{prefix}{group}/arrived/{index}", "1")
    store.add(f"{prefix}{group}/count", 1)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while store.add(f"{prefix}{group}/count", 0) < size:
        if time.monotonic() > deadline:
            missing = [i for i in range(size) if not store.check([f"{prefix}{group}/arrived/{i}"])]
            raise PeerTimeoutError(
                f"{group} {index}: timed out after {timeout:g}s waiting for {group} rank(s) "
                f"{missing} of {size} to join; check that every {group} was started with the "
                "same MASTER_ADDR, MASTER_PORT and WORLD_SIZE and that none crashed at start-up"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
