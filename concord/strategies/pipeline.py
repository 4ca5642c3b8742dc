"""Pipeline model parallelism: a model cut into stages, one per process, alone or with replicas.

``Pipeline(stages=P, microbatches=M, schedule="gpipe"|"1f1b", split=..., replicas=D)`` needs
``WORLD_SIZE == P * D`` workers. Rank layout: ``rank = replica * P + stage``, so ranks
``r*P .. r*P+P-1`` hold one full copy of the model (replica r) and ranks ``s, P+s, 2P+s, ..``
hold stage s of every replica (their gradients are averaged in ``opt.step()``). Every stage
of a replica must see the same batch: ``data_shard(ctx)`` is ``(replica, D)``.

Training goes through ``model.train_batch(x, y, loss_fn)``: the batch is cut into M
micro-batches (sizes differ by at most one when M does not divide it; with fewer samples than
M, one micro-batch per sample), run forward and backward in the schedule's order
(``concord.algorithms.schedules``), each micro-batch loss weighted by its share of the batch so
that gradients equal the unsplit model's on the whole batch (``loss_fn`` must average over its
micro-batch, like ``F.cross_entropy``). It returns the batch loss on every stage. ``model(x)``
is inference: the output comes back to every stage of the replica.

Activations and their gradients travel by ``torch.distributed`` isend/irecv (gloo on CPU),
each activation after a small shape header; every wait has the job timeout, and a stage that
dies or stalls makes its neighbours raise ``PeerTimeoutError`` naming its stage and rank.

``max_grad_norm=c`` clips the gradient by its norm over the whole model, as
``clip_grad_norm_(model.parameters(), c)`` does in one process: in ``opt.step()``, after the
replicas' average, every rank adds its stage's squared gradient norm into one all_reduce over
the job (each stage's part counted once per replica), and every stage scales its gradients by
the same coefficient. No stage holds the whole gradient, so clipping one stage alone (or in
the ``Trainer``) would not equal it.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from concord.algorithms import schedules as sched
from concord.algorithms.multi_optimizer import MultiOptimizer
from concord.algorithms.partition import Split, balanced_split, explicit_split
from concord.algorithms.ps_rules import clip_coefficient
from concord.errors import PeerTimeoutError, UsageError
from concord.strategies.allreduce import broadcast_state
from concord.strategies.base import (
    DataShard,
    Distributed,
    DistributedOptimizer,
    Strategy,
    model_device,
    positive_or_none,
)
from concord.strategies.pipeline_runtime import (
    PipelineStage,
    PipelineStats,
    StageLink,
    StagePlace,
    first_line,
)
from concord.strategies.sparse import average_sparse_grads, grad_norm, sparse_grad_params

if TYPE_CHECKING:
    from concord.comm.runtime import Context

SPLITS = ("params", "time")


@dataclass(frozen=True)
class Pipeline(Strategy):
    """Model parallelism: ``stages`` processes per model copy, ``replicas`` copies.

    ``split``: None or ``"params"`` (balance parameter counts), ``"time"`` (balance the
    forward+backward time measured on rank 0 on a batch of 32 samples shaped ``sample_shape``,
    inferred when the first layer with weights is ``nn.Linear``), or the P-1 indices of the
    first layer of stages 1..P-1. ``max_grad_norm``: clip each step's gradient to that norm over
    the whole model (all stages), as ``clip_grad_norm_`` does in one process.
    """

    stages: int = 2
    microbatches: int = 4
    schedule: str = "1f1b"
    split: str | tuple[int, ...] | None = None
    replicas: int = 1
    sample_shape: tuple[int, ...] | None = None
    max_grad_norm: float | None = None

    name = "pipeline"

    def __post_init__(self) -> None:
        for field_name in ("stages", "microbatches", "replicas"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"Pipeline({field_name}={value!r}): must be an integer >= 1")
        if self.schedule not in sched.SCHEDULES:
            raise UsageError(
                f"Pipeline(schedule={self.schedule!r}): choose one of {', '.join(sched.SCHEDULES)}"
            )
        if isinstance(self.split, list | tuple):
            object.__setattr__(self, "split", tuple(self.split))
            if len(self.split) != self.stages - 1:
                raise UsageError(
                    f"Pipeline(split={list(self.split)}): {self.stages} stages need "
                    f"{self.stages - 1} cut point(s), the first layer index of stages 1..P-1"
                )
        elif self.split is not None and self.split not in SPLITS:
            raise UsageError(
                f"Pipeline(split={self.split!r}): use None, 'params', 'time' or a list of "
                f"{self.stages - 1} layer indices"
            )
        positive_or_none("Pipeline(max_grad_norm)", self.max_grad_norm)
        if self.sample_shape is not None:
            object.__setattr__(self, "sample_shape", tuple(int(d) for d in self.sample_shape))

    def place(self, ctx: Context) -> StagePlace:
        """This process's stage and replica; checks that WORLD_SIZE is stages * replicas."""
        if ctx.world_size != self.stages * self.replicas:
            raise UsageError(
                f"stages({self.stages}) * replicas({self.replicas}) != "
                f"WORLD_SIZE({ctx.world_size}); start {self.stages * self.replicas} workers "
                "or change --stages/--replicas"
            )
        replica, stage = divmod(ctx.rank, self.stages)
        return StagePlace(stage, replica, self.stages, self.replicas)

    def data_shard(self, ctx: Context) -> DataShard:
        """Every stage of replica r reads data shard r of D (the same batches)."""
        return DataShard(self.place(ctx).replica, self.replicas)

    def distribute(
        self, model: nn.Module | Sequence[nn.Module], optimizer: torch.optim.Optimizer, ctx: Context
    ) -> Distributed:
        """Keep this rank's stage of ``model`` and an optimizer over only its parameters."""
        layers = as_layers(model)
        place = self.place(ctx)
        if ctx.world_size > 1:
            broadcast_state(nn.ModuleList([m for _, m in layers]))  # rank 0's weights win
        split = self.plan(layers, ctx)
        mine = [layers[i] for i in split.ranges()[place.stage]]
        link = StageLink(place, ctx.timeout, _device(layers))  # the model's: nccl for CUDA
        stage = PipelineStage(mine, place, self.microbatches, self.schedule, link)
        local_opt = restrict_optimizer(optimizer, list(stage.parameters()))
        group = _stage_groups(place, ctx.timeout)
        pipe_opt = PipelineOptimizer(
            local_opt,
            place,
            group,
            ctx.timeout,
            self.max_grad_norm,
            link.device,
            sparse_grad_params(stage),
        )
        return Distributed(stage, pipe_opt)

    def plan(self, layers: Sequence[tuple[str, nn.Module]], ctx: Context | None = None) -> Split:
        """The stage split of ``layers`` (the same on every rank)."""
        n = len(layers)
        if isinstance(self.split, tuple):
            return explicit_split(n, self.stages, self.split)
        if self.split == "time":
            return self._time_split(layers, ctx)
        costs = [sum(p.numel() for p in m.parameters()) for _, m in layers]
        if sum(costs) == 0:
            costs = [1] * n
        return balanced_split(costs, self.stages)

    def _time_split(self, layers: Sequence[tuple[str, nn.Module]], ctx: Context | None) -> Split:
        starts = torch.zeros(self.stages, dtype=torch.int64)
        if ctx is None or ctx.rank == 0:
            shape = self.sample_shape or _infer_sample_shape(layers)
            sample = torch.randn(32, *shape, device=_device(layers))
            seconds = measure_layer_seconds([m for _, m in layers], sample)
            starts = torch.tensor(balanced_split(seconds, self.stages).starts)
        if ctx is not None and ctx.world_size > 1:
            dist.broadcast(starts, 0)
        return Split(tuple(int(v) for v in starts), len(layers))


def as_layers(model: nn.Module | Sequence[nn.Module]) -> list[tuple[str, nn.Module]]:
    """The named layers of an ``nn.Sequential`` or a list of modules, in order."""
    if isinstance(model, nn.Sequential):
        layers = list(model.named_children())
    elif isinstance(model, nn.ModuleList | list | tuple):
        layers = [(str(i), m) for i, m in enumerate(model)]
    else:
        raise TypeError(
            f"Pipeline needs an nn.Sequential or a list of modules to cut into stages, got "
            f"{type(model).__name__}; write the model as nn.Sequential(layer, layer, ...)"
        )
    bad = [name for name, m in layers if not isinstance(m, nn.Module)]
    if bad or not layers:
        raise TypeError(f"every layer must be an nn.Module (bad: {bad}) and there must be one")
    return layers


def _infer_sample_shape(layers: Sequence[tuple[str, nn.Module]]) -> tuple[int, ...]:
    for _, module in layers:
        if isinstance(module, nn.Linear):
            return (module.in_features,)
        if any(True for _ in module.parameters()):
            break
    raise UsageError(
        "Pipeline(split='time') cannot infer the input shape of this model; pass "
        "Pipeline(..., sample_shape=(C, H, W)), the shape of one input sample"
    )


def _device(layers: Sequence[tuple[str, nn.Module]]) -> torch.device:
    """The device of the whole model (every stage uses it, also one without parameters)."""
    return model_device([p for _, m in layers for p in m.parameters()])


def measure_layer_seconds(
    modules: Sequence[nn.Module], sample: torch.Tensor, repeats: int = 5
) -> list[float]:
    """Median forward+backward seconds of each layer on ``sample`` (after one warm-up).

    Runs on copies, so the model's gradients and buffers (BatchNorm statistics) stay as
    they were.
    """
    seconds = []
    x = sample
    for module in copy.deepcopy(list(modules)):
        times = []
        for i in range(repeats + 1):
            inp = x.detach().requires_grad_(x.is_floating_point())
            start = time.perf_counter()
            out = module(inp)
            if out.requires_grad:
                out.backward(torch.ones_like(out))
            if out.is_cuda:
                torch.cuda.synchronize(out.device)  # the kernels ran, not just queued
            if i:
                times.append(time.perf_counter() - start)
        seconds.append(sorted(times)[len(times) // 2])
        x = out.detach()
    return seconds


def restrict_optimizer(
    optimizer: torch.optim.Optimizer, keep: Sequence[nn.Parameter]
) -> torch.optim.Optimizer:
    """A new optimizer of the same class and hyperparameters over only ``keep``.

    Param groups keep their order and settings (a group may end up empty); existing state
    (momentum buffers) of the kept parameters carries over. A MultiOptimizer gives a
    MultiOptimizer of its optimizers restricted.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}; build it on "
            "the whole model's parameters, then distribute both"
        )
    if isinstance(optimizer, MultiOptimizer):
        return MultiOptimizer(*(restrict_optimizer(opt, keep) for opt in optimizer.optimizers))
    ids = {id(p) for p in keep}
    groups = [
        {
            **{k: v for k, v in g.items() if k != "params"},
            "params": [p for p in g["params"] if id(p) in ids],
        }
        for g in optimizer.param_groups
    ]
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    local = cls(groups, **defaults)
    for group in local.param_groups:
        for p in group["params"]:
            if p in optimizer.state:
                local.state[p] = optimizer.state[p]
    return local


def _stage_groups(place: StagePlace, timeout: float) -> Any:
    """The process group of this stage across replicas (every rank creates all of them)."""
    if place.replicas == 1:
        return None
    mine = None
    for stage in range(place.stages):
        ranks = [r * place.stages + stage for r in range(place.replicas)]
        group = dist.new_group(ranks, timeout=timedelta(seconds=timeout))
        if stage == place.stage:
            mine = group
    return mine


class PipelineOptimizer(DistributedOptimizer):
    """This stage's optimizer; ``step()`` first averages the stage's gradients over the
    replicas, then (``max_grad_norm``) clips them by the whole model's gradient norm.

    ``last_grad_norm``: that norm at the last step (None without ``max_grad_norm``), what
    ``clip_grad_norm_`` returns; ``clipped``: how many steps it scaled.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        place: StagePlace,
        group: Any,
        timeout: float,
        max_grad_norm: float | None = None,
        device: torch.device | None = None,
        sparse: set[int] | None = None,
    ) -> None:
        super().__init__(optimizer)
        self.sparse = sparse or set()  # id()s of parameters with sparse gradients (embeddings)
        self.place = place
        self.group = group
        self.timeout = timeout
        self.max_grad_norm = max_grad_norm
        self.device = device or torch.device("cpu")
        self.last_grad_norm: float | None = None
        self.clipped = 0

    # torch.amp.GradScaler.step(opt) then calls step() with ``found_inf`` set, refused there:
    # the last stage's scale scales every stage's gradients, while each stage's scaler would
    # back off on its own overflows only
    _step_supports_amp_scaling = True

    def step(self, closure: Any = None) -> Any:
        if getattr(self, "found_inf", None) is not None:
            raise UsageError(
                "Pipeline does not take a torch.amp.GradScaler (train_batch runs backward "
                "itself, and the stages' scalers could not agree on the scale); use "
                "torch.autocast with dtype=torch.bfloat16, which needs no loss scaling"
            )
        return super().step(closure)

    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def synchronize(self) -> None:
        if self.place.replicas > 1:
            self._average_replicas()
        if self.max_grad_norm is not None:
            self._clip(self.max_grad_norm)

    def _all_reduce(
        self, flat: torch.Tensor, group: Any, ranks: list[int], what: str
    ) -> torch.Tensor:
        """Sum ``flat`` over ``group`` in place (and return it), within the job timeout."""
        work = dist.all_reduce(flat, group=group, async_op=True)
        try:
            work.wait(timeout=timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise PeerTimeoutError(
                f"pipeline stage {self.place.stage} (rank {self.place.rank}): {what} (ranks "
                f"{ranks}) failed within {self.timeout:g}s: {first_line(exc)}"
            ) from None
        return flat

    def _average_replicas(self) -> None:
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self._params():
            if id(p) in self.sparse:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        ranks = [r * self.place.stages + self.place.stage for r in range(self.place.replicas)]
        what = "averaging gradients with the same stage of the other replicas"
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            self._all_reduce(flat, self.group, ranks, what)
            flat /= self.place.replicas
            offset = 0
            for p in group:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        embeddings = [p for p in self._params() if id(p) in self.sparse]  # rows only, as DDP

        def sum_(tensor: torch.Tensor) -> torch.Tensor:
            return self._all_reduce(tensor, self.group, ranks, what + " (embeddings)")

        gloo = self.device.type == "cpu"  # sums sparse tensors itself (nccl does not)
        average_sparse_grads(embeddings, self.place.replicas, sum_, sum_ if gloo else None)

    def _clip(self, max_norm: float) -> None:
        """Scale every stage's gradients by ``clip_grad_norm_``'s coefficient for the whole
        model: one all_reduce of the stages' squared norms (each replica adds the same part)."""
        grads = [p.grad for p in self._params() if p.grad is not None]
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        if grads:
            total += grad_norm(grads).double() ** 2
        world = self.place.stages * self.place.replicas
        what = "adding up the gradient norm of every stage (max_grad_norm)"
        self._all_reduce(total, None, list(range(world)), what)
        sum_of_squares = float(total) / self.place.replicas
        self.last_grad_norm = sum_of_squares**0.5
        scale = clip_coefficient([sum_of_squares], max_norm)
        if scale < 1.0:
            self.clipped += 1
            for grad in grads:
                grad.mul_(scale)


__all__ = [
    "Pipeline",
    "PipelineOptimizer",
    "PipelineStage",
    "PipelineStats",
    "StageLink",
    "StagePlace",
    "as_layers",
    "measure_layer_seconds",
    "restrict_optimizer",
]
