"""The pure half of the launcher: which processes a job has, with what command and env.

``plan(config, port, secret, attempt)`` returns one ``ProcessSpec`` per process this node
starts: ``workers`` workers, and on node 0 also ``servers`` parameter servers and the data
server. It touches no sockets, files or processes, so tests check the exact env of every rank.
The env contract is the one of DESIGN.md (torchrun's names plus ``CONCORD_*``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from concord.comm.rendezvous import DEVICES
from concord.comm.sched import SCHED_ENV, default_worker_sched
from concord.comm.spin import SPIN_ENV, default_spin_us
from concord.errors import UsageError

SERVER_MODULE = "concord.strategies.ps.server"
DATA_MODULE = "concord.data.server"

#: variables the launcher sets for every child; ``LaunchConfig.env`` may not override them
CONTRACT_VARS = frozenset(
    {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "CONCORD_ROLE",
        "CONCORD_SERVERS",
        "CONCORD_SECRET",
        "CONCORD_TIMEOUT",
        "CONCORD_ATTEMPT",
        "CONCORD_DATA_SERVER",
        "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_MAX_RESTARTS",
        "TORCHELASTIC_USE_AGENT_STORE",
    }
)

#: set for every child unless the user's environment (or ``LaunchConfig.env``) has them
DEFAULT_VARS = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class LaunchConfig:
    """One ``concord run`` invocation on one node, validated on construction.

    ``program`` is ``(script, *args)`` or ``("-m", module, *args)``. ``servers`` parameter
    servers run ``python -m <server_module>``; ``data_server`` (a dataset name) adds one
    ``python -m <data_module> NAME`` process. Both run on node 0 only. ``master_port`` 0
    picks a free port (single node only). ``secret`` None makes a fresh one per job.
    """

    program: tuple[str, ...]
    workers: int = 1
    servers: int = 0
    data_server: str | None = None
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    max_restarts: int = 0
    timeout: float = 300.0
    secret: str | None = None
    device: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    server_module: str = SERVER_MODULE
    data_module: str = DATA_MODULE

    def __post_init__(self) -> None:
        object.__setattr__(self, "program", tuple(str(p) for p in self.program))
        object.__setattr__(self, "env", {str(k): str(v) for k, v in dict(self.env).items()})
        _check_program(self.program)
        _check_counts(self)
        _check_network(self)
        if not self.timeout > 0:
            raise UsageError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.device is not None and self.device not in DEVICES:
            raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.data_server is not None and not self.data_server.strip():
            raise UsageError("--data-server needs a dataset name, e.g. --data-server mnist")
        reserved = sorted(CONTRACT_VARS & set(self.env))
        if reserved:
            raise UsageError(
                f"env may not set {', '.join(reserved)}: the launcher sets them for each "
                "process; use the launcher's options (-n, --master-port, ...) instead"
            )

    @property
    def world_size(self) -> int:
        """Workers in the whole job (all nodes)."""
        return self.workers * self.nnodes

    @property
    def is_module(self) -> bool:
        """True when ``program`` runs a module (``-m``) rather than a script."""
        return self.program[0] == "-m"


def _check_program(program: tuple[str, ...]) -> None:
    if not program or not program[0]:
        raise UsageError("nothing to run: give a script (concord run train.py) or -m MODULE")
    if program[0] == "-m":
        if len(program) < 2 or not program[1] or program[1].startswith("-"):
            raise UsageError(
                "-m needs a module name, e.g. concord run -m concord.jobs.train_worker"
            )
    elif program[0].startswith("-"):
        raise UsageError(f"program must be a script path or -m MODULE, got {program[0]!r}")


def _check_counts(config: LaunchConfig) -> None:
    for name, value, low in (
        ("-n/--workers", config.workers, 1),
        ("--servers", config.servers, 0),
        ("--nnodes", config.nnodes, 1),
        ("--max-restarts", config.max_restarts, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(config.node_rank, int) or not 0 <= config.node_rank < config.nnodes:
        raise UsageError(
            f"--node-rank must be in 0..{config.nnodes - 1} for --nnodes {config.nnodes}, "
            f"got {config.node_rank!r}"
        )


def _check_network(config: LaunchConfig) -> None:
    if not config.master_addr:
        raise UsageError("--master-addr is empty; give node 0's host name or IP address")
    if not isinstance(config.master_port, int) or not 0 <= config.master_port < 65536:
        raise UsageError(f"--master-port must be in 0..65535, got {config.master_port!r}")
    if config.secret is not None and not config.secret:
        raise UsageError("the job secret is empty; unset CONCORD_SECRET or give a non-empty one")
    if config.nnodes > 1:
        if config.master_port == 0:
            raise UsageError(
                f"--nnodes {config.nnodes} needs a fixed --master-port that every node passes "
                "(e.g. --master-port 29500); 0 (pick a free port) works on one node only"
            )
        if config.secret is None:
            raise UsageError(
                f"--nnodes {config.nnodes} needs the same job secret on every node: run "
                "export CONCORD_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))')"
                " once and pass that value to every node's launcher"
            )


@dataclass(frozen=True)
class ProcessSpec:
    """One process to start: its role (worker | server | data), rank, command and full env."""

    role: str
    rank: int
    argv: tuple[str, ...]
    env: dict[str, str]

    @property
    def name(self) -> str:
        """How output prefixes and error messages name this process, e.g. ``worker 1``."""
        return f"{self.role} {self.rank}"


def plan(
    config: LaunchConfig,
    port: int,
    secret: str,
    attempt: int = 0,
    *,
    inherited: Mapping[str, str] | None = None,
    python: str = sys.executable,
    cores: int | None = None,
) -> list[ProcessSpec]:
    """The processes this node starts for launch ``attempt`` (0 first, +1 per restart).

    ``port`` is the store's actual port (the launcher resolves ``master_port`` 0),
    ``inherited`` the environment children start from (the launcher passes ``os.environ``).
    Env precedence: inherited < defaults (PYTHONUNBUFFERED, OMP_NUM_THREADS) < config.env <
    the contract. Workers come first (local rank order), then servers, then the data server.
    ``cores``: this node's usable cores; unless the environment sets ``CONCORD_SPIN_US``, every
    process gets :func:`~concord.comm.spin.default_spin_us` for the node's process count
    (spin before sleeping only when each process has a core of its own), and unless it sets
    ``CONCORD_WORKER_SCHED``, every worker gets :func:`~concord.comm.sched.default_worker_sched`
    (``batch`` on a node with servers and more processes than cores).
    """
    if not 0 < port < 65536:
        raise ValueError(f"port must be an actual TCP port in 1..65535, got {port}")
    if not secret:
        raise ValueError("secret must be non-empty")
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    base = dict(inherited or {})
    for name, value in DEFAULT_VARS.items():
        if name not in base and name not in config.env:
            base[name] = value
    base |= config.env
    base |= _common_env(config, port, secret, attempt)
    specs = [_worker(config, local, base, python) for local in range(config.workers)]
    if config.node_rank == 0:
        server_argv = (python, "-m", config.server_module)
        for index in range(config.servers):
            specs.append(_spec("server", index, server_argv, base, index))
        if config.data_server is not None:
            data_argv = (python, "-m", config.data_module, config.data_server)
            specs.append(_spec("data", 0, data_argv, base, 0))
    if SPIN_ENV not in base:
        spin = str(default_spin_us(len(specs), cores))
        for spec in specs:
            spec.env[SPIN_ENV] = spin
    if SCHED_ENV not in base:
        servers = sum(spec.role == "server" for spec in specs)
        policy = default_worker_sched(len(specs), cores, servers)
        for spec in specs:
            if spec.role == "worker":
                spec.env[SCHED_ENV] = policy
    return specs


def _common_env(config: LaunchConfig, port: int, secret: str, attempt: int) -> dict[str, str]:
    device = {} if config.device is None else {"CONCORD_DEVICE": config.device}
    return device | {
        "MASTER_ADDR": config.master_addr,
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(config.world_size),
        "LOCAL_WORLD_SIZE": str(config.workers),
        "GROUP_RANK": str(config.node_rank),
        "GROUP_WORLD_SIZE": str(config.nnodes),
        "CONCORD_SERVERS": str(config.servers),
        "CONCORD_SECRET": secret,
        "CONCORD_TIMEOUT": f"{config.timeout:g}",
        "CONCORD_ATTEMPT": str(attempt),
        "CONCORD_DATA_SERVER": config.data_server or "",
        "TORCHELASTIC_RESTART_COUNT": str(attempt),
        "TORCHELASTIC_MAX_RESTARTS": str(config.max_restarts),
        # the launcher on node 0 hosts the TCPStore: every process connects as a client
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }


def _worker(config: LaunchConfig, local: int, base: dict[str, str], python: str) -> ProcessSpec:
    rank = config.node_rank * config.workers + local
    return _spec("worker", rank, (python, *config.program), base, local)


def _spec(
    role: str, rank: int, argv: tuple[str, ...], base: dict[str, str], local: int
) -> ProcessSpec:
    env = base | {"CONCORD_ROLE": role, "RANK": str(rank), "LOCAL_RANK": str(local)}
    return ProcessSpec(role=role, rank=rank, argv=argv, env=env)
