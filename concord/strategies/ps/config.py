"""The ``ParameterServer`` strategy: a frozen, validated description of the PS mode."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from concord.errors import UsageError
from concord.strategies.base import Distributed, Strategy, positive_or_none

if TYPE_CHECKING:
    from concord.comm.runtime import Context

MODES = ("sync", "async")
PUSHES = ("grad", "delta")
#: push compression -> the wire dtype of float32/float64 gradients (summed in full precision)
COMPRESSIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def pushed_dtype(compression: str | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient of ``dtype`` travels in under ``compression`` (half precision for
    float32/float64, else its own); what workers send and servers accept."""
    wire = COMPRESSIONS.get(compression or "")
    return wire if wire is not None and dtype in (torch.float32, torch.float64) else dtype


def _int_or_none(name: str, value: Any, low: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class ParameterServer(Strategy):
    """Parameters live on S server processes; workers push gradients and pull parameters.

    - ``mode="sync"``: every step each shard waits for all N gradients (or the first
      ``N - backup_workers``), averages them, steps the optimizer and answers with the new
      parameters; equals one process training on the global batch.
    - ``mode="async", push="grad"``: each gradient is applied as it arrives (Downpour).
    - ``mode="async", push="delta"``: each worker steps its own optimizer and pushes the change
      in its parameters, which the server adds.
    - ``max_staleness=s`` (async): no worker runs more than ``s`` steps ahead of the slowest.
    - ``min_workers=m`` (sync): after a timeout, go on with at least ``m`` survivors.
    - ``servers``: how many servers the job was started with (None: ``CONCORD_SERVERS``).
    - ``overlap=True`` (push="grad"): push each shard's gradient from autograd hooks as soon as
      backward has produced it, and receive the new parameters in the background; the next
      forward waits for them. Same results (see ``concord.strategies.ps.overlap``).
    - ``max_grad_norm=c`` (sync): the servers clip each step's averaged gradient by its norm over
      the whole model, as ``clip_grad_norm_(params, c)`` does in one process (see
      ``concord.strategies.ps.norms``); do not also clip on the workers.
    - ``compression="fp16" | "bf16"`` (push="grad"): float32/float64 gradients are pushed in
      half precision (half the bytes up, as BytePS and Horovod compress); the servers sum,
      average and step in full precision, and the parameters come back in full precision.

    Start servers with ``concord run -n 4 --servers 2 train.py``.
    """

    mode: str = "sync"
    push: str = "grad"
    max_staleness: int | None = None
    backup_workers: int = 0
    min_workers: int | None = None
    servers: int | None = None
    overlap: bool = False
    max_grad_norm: float | None = None
    compression: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.push not in PUSHES:
            raise ValueError(f"push must be one of {PUSHES}, got {self.push!r}")
        _int_or_none("max_staleness", self.max_staleness, 0)
        _int_or_none("backup_workers", self.backup_workers, 0)
        _int_or_none("min_workers", self.min_workers, 1)
        _int_or_none("servers", self.servers, 1)
        if self.backup_workers is None:
            raise TypeError("backup_workers must be an int (0 for none)")
        if not isinstance(self.overlap, bool):
            raise TypeError(f"overlap must be True or False, got {self.overlap!r}")
        if self.overlap and self.push == "delta":
            raise ValueError(
                "overlap=True needs push='grad' (push='delta' steps the local optimizer first, "
                "so nothing can be pushed during backward); use overlap=False"
            )
        if self.mode == "sync" and self.push == "delta":
            raise ValueError(
                "push='delta' needs mode='async' (sync mode averages gradients on the servers)"
            )
        if self.mode == "sync" and self.max_staleness is not None:
            raise ValueError(
                "max_staleness applies to mode='async'; sync mode is already max_staleness=0"
            )
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise ValueError(
                f"compression must be None or one of {list(COMPRESSIONS)}, got {self.compression!r}"
            )
        if self.compression is not None and self.push == "delta":
            raise ValueError(
                "compression applies to push='grad' (a parameter change in half precision "
                "would lose the small updates it carries)"
            )
        positive_or_none("max_grad_norm", self.max_grad_norm)
        if self.mode == "async" and self.max_grad_norm is not None:
            raise ValueError(
                "max_grad_norm applies to mode='sync' (async applies each worker's gradient as "
                "it arrives; clip it on the worker before step() instead)"
            )
        if self.mode == "async" and (self.backup_workers or self.min_workers is not None):
            raise ValueError(
                "backup_workers and min_workers apply to mode='sync'; async mode never waits "
                "for the slowest worker (bound it with max_staleness instead)"
            )

    @property
    def name(self) -> str:  # type: ignore[override]
        if self.mode == "sync":
            return "ps-sync"
        return "ps-async" if self.push == "grad" else "ps-async-delta"

    def config(self, workers: int) -> dict[str, Any]:
        """What every server shard is told at registration (checked equal on all workers;
        ``servers`` is left out: None and the job's count mean the same; ``overlap`` too: it
        is the worker's business and changes no result)."""
        settings = asdict(self)
        del settings["servers"], settings["overlap"]
        return settings | {"workers": workers}

    def check_job(self, ctx: Context) -> int:
        """The number of servers, after checking this strategy against the job ``ctx``."""
        if ctx.role != "worker":
            raise UsageError(f"distribute() runs on workers, not on a {ctx.role} process")
        if ctx.servers < 1:
            raise UsageError(
                "ParameterServer needs server processes but this job has none "
                "(CONCORD_SERVERS=0); start it with: concord run -n N --servers S script.py"
            )
        if self.servers is not None and self.servers != ctx.servers:
            raise UsageError(
                f"ParameterServer(servers={self.servers}) but the job started {ctx.servers} "
                f"server(s) (CONCORD_SERVERS={ctx.servers}); use concord run --servers "
                f"{self.servers}, or leave servers=None"
            )
        if self.backup_workers >= ctx.world_size:
            raise UsageError(
                f"backup_workers={self.backup_workers} must be < the number of workers "
                f"({ctx.world_size})"
            )
        if self.min_workers is not None and self.min_workers > ctx.world_size:
            raise UsageError(
                f"min_workers={self.min_workers} exceeds the number of workers ({ctx.world_size})"
            )
        if len(ctx.secret) < 16:
            raise UsageError(
                "parameter servers authenticate every message with CONCORD_SECRET, which is "
                "unset or shorter than 16 bytes; concord run sets it, or export "
                "CONCORD_SECRET=$(python -c 'import secrets;print(secrets.token_hex(32))') "
                "on every process"
            )
        return ctx.servers

    def distribute(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context
    ) -> Distributed:
        from concord.strategies.ps.client import connect

        servers = self.check_job(ctx)
        return Distributed(model, connect(self, model, optimizer, ctx, servers))
