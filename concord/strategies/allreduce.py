"""AllReduce data parallelism: every worker averages gradients with every other, no server.

``AllReduce(bucket_mb=25, engine="auto", compression=None, check_every=None)``. At wrap time
rank 0's parameters and buffers are copied to every worker. Gradients are fused into buckets
and each bucket is averaged as soon as backward has produced all of its gradients, while
backward goes on (see ``concord.strategies.reducer``). Single-process semantics, with no
flag: a parameter no worker used ends the step with ``grad=None``; one used by some workers
only is averaged over all N with zeros for the others; frozen parameters are never sent;
tied parameters are reduced once; ``with model.no_sync():`` accumulates locally.

Engines: ``"torch"`` (torch.distributed all_reduce: gloo on CPU, nccl on GPU) and ``"ring"``
(concord's ring over shared memory, one host, CPU). ``"auto"`` picks the ring on CPU when all
workers share a host (it measured faster than gloo here, see the README), else torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from concord.algorithms.buckets import ParamSpec, plan_buckets
from concord.algorithms.codecs import CODECS, PowerSGD, codec
from concord.comm.shm import ShmRing
from concord.errors import ConcordError, PeerTimeoutError, UsageError
from concord.strategies.base import (
    Distributed,
    DistributedOptimizer,
    Strategy,
    model_device,
)
from concord.strategies.reducer import (
    LowRank,
    Reducer,
    RingEngine,
    TorchEngine,
    check_engine_device,
)
from concord.strategies.sparse import sparse_grad_params

if TYPE_CHECKING:
    from concord.comm.runtime import Context

ENGINES = ("auto", "torch", "ring")
_instances = itertools.count()  # distribute() calls, to keep their store keys apart


@dataclass(frozen=True)
class AllReduce(Strategy):
    """Decentralized data parallelism: gradients averaged by allreduce across workers.

    - ``bucket_mb``: bucket size; ``first_bucket_mb``: the first (last layers') bucket, kept
      small so communication starts early in backward;
    - ``engine``: ``"auto" | "torch" | "ring"``; ``chunk_kb``: ring pipelining piece size;
    - ``compression``: None, ``"fp16"`` or ``"bf16"`` (cast for the wire, sums in fp32), or
      ``concord.PowerSGD(rank=r)`` (low-rank with error feedback);
    - ``check_every``: every K steps, check that all replicas are bit-identical.
    """

    bucket_mb: float = 25.0
    first_bucket_mb: float = 1.0
    engine: str = "auto"
    compression: str | PowerSGD | None = None
    check_every: int | None = None
    chunk_kb: int = 1024

    name = "allreduce"

    def __post_init__(self) -> None:
        for field in ("bucket_mb", "first_bucket_mb"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"AllReduce({field}={value!r}): must be a positive number of MB")
        if self.engine not in ENGINES:
            raise ValueError(
                f"AllReduce(engine={self.engine!r}): choose one of {', '.join(ENGINES)}"
            )
        low_rank = isinstance(self.compression, PowerSGD)
        if not (self.compression is None or low_rank or self.compression in CODECS):
            raise ValueError(
                f"AllReduce(compression={self.compression!r}): choose None, one of "
                f"{', '.join(CODECS)}, or concord.PowerSGD(rank=...)"
            )
        for field in ("check_every", "chunk_kb"):
            value = getattr(self, field)
            if value is None and field == "check_every":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AllReduce({field}={value!r}): must be a positive integer")

    def distribute(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context
    ) -> Distributed:
        if ctx.role != "worker":
            raise UsageError(f"AllReduce runs on workers only, not on a {ctx.role}")
        _check_optimizer(model, optimizer)
        broadcast_state(model)
        reducer = self._reducer(model, ctx) if ctx.world_size > 1 else None
        wrapped = AllReduceModel(model, reducer)
        return Distributed(wrapped, AllReduceOptimizer(optimizer, wrapped, self.check_every))

    def resolve_engine(
        self, ctx: Context, prefix: str, wire_bytes: int = 0, device: torch.device | None = None
    ) -> str:
        """The engine this job uses for gradients on ``device`` (default ``ctx.device``; the
        same answer on every worker)."""
        device = ctx.device if device is None else device
        check_engine_device(self.engine, device)
        if self.engine == "ring" and not ShmRing.available():
            raise UsageError(
                f'AllReduce(engine="ring") needs x86-64 shared memory; this is '
                f'{platform.machine()}: use engine="torch" or "auto"'
            )
        if self.engine != "auto":
            return self.engine
        if device.type != "cpu":
            return "torch"
        # every worker on this host needs its own wire in shared memory
        fits = ShmRing.available(2 * ctx.world_size * wire_bytes)
        return "ring" if _all_agree(ctx, prefix, f"{platform.node()} {fits}") else "torch"

    def _reducer(self, model: nn.Module, ctx: Context) -> Reducer:
        trainable = [p for p in model.parameters() if p.requires_grad]
        device = model_device(trainable)
        embeddings = sparse_grad_params(model)  # reduced as sparse tensors, not in buckets
        params = [p for p in trainable if id(p) not in embeddings]
        sparse = [p for p in trainable if id(p) in embeddings]
        specs = [ParamSpec(p.numel(), p.element_size(), f"{p.dtype}@{p.device}") for p in params]
        plan = plan_buckets(
            specs,
            int(self.bucket_mb * 2**20),
            int(min(self.first_bucket_mb, self.bucket_mb) * 2**20),
        )
        dtypes = [params[b.slots[0].param].dtype for b in plan.buckets]
        prefix = f"{ctx.store_prefix}allreduce/{next(_instances)}/"
        low_rank = self.compression if isinstance(self.compression, PowerSGD) else None
        wire_codec = None if low_rank else codec(self.compression)
        # sparse gradients' sums (a row mask, then the touched rows) in a scratch region
        scratch = max(((p.numel() + p.shape[0]) * p.element_size() for p in sparse), default=0)
        nbytes = RingEngine.wire_bytes(plan, dtypes, wire_codec, scratch)
        engine_name = self.resolve_engine(ctx, prefix, nbytes, device)
        if engine_name == "ring":
            ring = ShmRing(
                ctx.rank,
                ctx.world_size,
                ctx.store,
                prefix + "ring/",
                nbytes,
                ctx.timeout,
                ctx.secret,
            )
            engine = RingEngine(
                plan, dtypes, ring, wire_codec, ctx.world_size, self.chunk_kb * 1024
            )
        else:
            engine = TorchEngine(plan, dtypes, device, wire_codec, ctx.world_size, ctx.timeout)
        if low_rank is not None:
            for b, dtype in zip(plan.buckets, dtypes):
                shapes = [params[slot.param].shape for slot in b.slots]
                engine.low_rank[b.index] = LowRank(
                    b, shapes, low_rank, dtype, ctx.world_size, device
                )
        return Reducer(params, plan, engine, ctx.world_size, sparse)


def _check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    own = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in own:
                raise UsageError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not in "
                    "the model; build the optimizer on model.parameters() before distributing"
                )


def _all_agree(ctx: Context, prefix: str, mine: str) -> bool:
    """Whether every worker published the same ``mine`` (one host, shared memory to spare).

    The same answer on every worker. A value ending in "False" never agrees.
    """
    ctx.store.set(f"{prefix}host/{ctx.rank}", mine)
    keys = [f"{prefix}host/{r}" for r in range(ctx.world_size)]
    try:
        ctx.store.wait(keys, timedelta(seconds=ctx.timeout))
    except Exception:  # noqa: BLE001 - the store raises plain RuntimeError
        missing = [r for r, k in enumerate(keys) if not ctx.store.check([k])]
        raise PeerTimeoutError(
            f"worker rank(s) {missing} did not reach AllReduce set-up within {ctx.timeout:g}s"
        ) from None
    return not mine.endswith("False") and all(ctx.store.get(k).decode() == mine for k in keys)


def broadcast_state(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every worker (one message per dtype)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    tensors = [*model.parameters(), *model.buffers()]
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for group in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


class AllReduceModel(nn.Module):
    """The user's model, unchanged, plus ``no_sync()``; ``.module`` is the original.

    ``state_dict()``/``load_state_dict()`` are the original's (no prefix), so checkpoints
    load into a plain model.
    """

    def __init__(self, module: nn.Module, reducer: Reducer | None) -> None:
        super().__init__()
        self.module = module
        self.reducer = reducer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally; the next one outside syncs."""
        if self.reducer is None:
            yield
            return
        previous, self.reducer.enabled = self.reducer.enabled, False
        try:
            yield
        finally:
            self.reducer.enabled = previous

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def close(self) -> None:
        """Remove the hooks and free the engine (the model keeps working, unsynchronized)."""
        if self.reducer is not None:
            self.reducer.close()
            self.reducer = None


class AllReduceOptimizer(DistributedOptimizer):
    """``step()`` waits for the buckets still in flight, then steps the wrapped optimizer."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, model: AllReduceModel, check_every: int | None
    ) -> None:
        super().__init__(optimizer)
        self.model = model
        self.check_every = check_every
        self.steps = 0

    def synchronize(self) -> None:
        if self.model.reducer is not None:
            self.model.reducer.synchronize()

    def step(self, closure: Any = None) -> Any:
        out = super().step(closure)
        self.steps += 1
        if self.check_every and self.steps % self.check_every == 0:
            check_replicas(self.model.module, self.steps)
        return out


def _digest(tensor: torch.Tensor) -> int:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return int.from_bytes(
        hashlib.blake2b(data.tobytes(), digest_size=8).digest(), "little", signed=True
    )


def check_replicas(model: nn.Module, step: int = 0) -> None:
    """Raise ConcordError unless every worker's parameters are bit-identical to rank 0's."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    named = list(model.named_parameters())
    device = named[0][1].device if named and dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor([_digest(p) for _, p in named], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    ref = gathered[0]
    for rank, theirs in enumerate(gathered[1:], start=1):
        differ = (theirs != ref).nonzero().flatten().tolist()
        if differ:
            raise ConcordError(
                f"replica check at step {step}: worker rank {rank} diverged from rank 0 in "
                f"parameter(s) {[named[i][0] for i in differ[:5]]}; a worker changed parameters "
                "outside optimizer.step() or stepped a different number of times"
            )
