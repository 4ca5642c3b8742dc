"""The pipeline runtime: one stage's modules, its messages, and the schedule executor.

``PipelineStage`` is what ``Pipeline.distribute`` returns as the model on every rank: it holds
only this stage's layers (registered under their names in the unsplit ``nn.Sequential``, so its
``state_dict`` keys match the full model's) and runs one batch with ``train_batch`` by executing
this stage's action list from ``concord.algorithms.schedules``. ``StageLink`` moves tensors
between the stages of one replica with ``torch.distributed`` isend/irecv; every wait is bounded
by the job timeout and its error names the peer stage and rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from concord.algorithms import schedules as sched
from concord.errors import PeerTimeoutError, UsageError


@dataclass(frozen=True)
class StagePlace:
    """Where one process sits: ``stage`` of ``stages`` in ``replica`` of ``replicas``."""

    stage: int
    replica: int
    stages: int
    replicas: int

    def rank_of(self, stage: int) -> int:
        """Global rank of ``stage`` in this process's replica."""
        return self.replica * self.stages + stage

    @property
    def rank(self) -> int:
        return self.rank_of(self.stage)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# message kinds (the tag's high part) and the header layout: [dtype code, ndim, dims...]
ACT, GRAD, LOSS, EVAL_ACT, EVAL_OUT = 1, 2, 3, 4, 5
KIND_NAMES = {
    ACT: "the activation",
    GRAD: "the activation gradient",
    LOSS: "the batch loss",
    EVAL_ACT: "the inference activation",
    EVAL_OUT: "the inference output",
}
MAX_DIMS = 8
DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


@dataclass
class Incoming:
    """A posted receive: ``buf`` fills when ``work`` completes."""

    work: Any
    buf: torch.Tensor
    stage: int
    kind: int
    mb: int
    header: bool


class StageLink:
    """Point-to-point messages between the stages of one replica, each wait bounded."""

    def __init__(self, place: StagePlace, timeout: float, device: torch.device) -> None:
        self.place = place
        self.timeout = timeout
        self.device = device
        self.pending: list[tuple[Any, str, int, torch.Tensor]] = []

    @staticmethod
    def _tag(kind: int, microbatch: int, header: bool = False) -> int:
        return kind << 20 | microbatch << 1 | int(header)

    def send(self, tensor: torch.Tensor, stage: int, kind: int, mb: int, header: bool) -> None:
        """Start sending ``tensor`` (after its shape header when ``header``) to ``stage``."""
        tensor = tensor.detach().contiguous()
        if header:
            if tensor.dim() > MAX_DIMS or tensor.dtype not in DTYPES:
                raise UsageError(
                    f"pipeline stage {self.place.stage} output has dtype {tensor.dtype} and "
                    f"{tensor.dim()} dims; stages may pass one tensor of <= {MAX_DIMS} dims "
                    f"and dtype in {[str(d) for d in DTYPES]}"
                )
            head = torch.zeros(2 + MAX_DIMS, dtype=torch.int64)
            head[0], head[1] = DTYPES.index(tensor.dtype), tensor.dim()
            head[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
            self._isend(head.to(self.device), stage, kind, mb, True)
        self._isend(tensor, stage, kind, mb, False)

    def _isend(self, tensor: torch.Tensor, stage: int, kind: int, mb: int, header: bool) -> None:
        what = f"sending {KIND_NAMES[kind]} of micro-batch {mb}"
        try:
            work = dist.isend(tensor, self.place.rank_of(stage), tag=self._tag(kind, mb, header))
        except RuntimeError as exc:
            raise self._error(exc, what, stage) from None
        self.pending.append((work, what, stage, tensor))

    def post(
        self,
        stage: int,
        kind: int,
        mb: int,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> Incoming:
        """Post a receive from ``stage`` now (finish it with ``take``); without ``shape`` a
        header announces shape and dtype. Posting early lets the message land while this
        stage computes."""
        if shape is None:
            buf = torch.empty(2 + MAX_DIMS, dtype=torch.int64, device=self.device)
        else:
            buf = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        header = shape is None
        try:
            work = dist.irecv(buf, self.place.rank_of(stage), tag=self._tag(kind, mb, header))
        except RuntimeError as exc:
            raise self._error(exc, f"{KIND_NAMES[kind]} of micro-batch {mb}", stage) from None
        return Incoming(work, buf, stage, kind, mb, header)

    def take(self, incoming: Incoming) -> torch.Tensor:
        """Wait for a posted receive; returns the tensor (after its header, if any)."""
        what = f"{KIND_NAMES[incoming.kind]}{' header' if incoming.header else ''}"
        try:
            incoming.work.wait(timeout=timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise self._error(exc, f"{what} of micro-batch {incoming.mb}", incoming.stage) from None
        if not incoming.header:
            return incoming.buf
        head = incoming.buf.cpu()
        shape = [int(d) for d in head[2 : 2 + int(head[1])]]
        return self.recv(incoming.stage, incoming.kind, incoming.mb, shape, DTYPES[int(head[0])])

    def recv(
        self,
        stage: int,
        kind: int,
        mb: int,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Receive from ``stage`` now (``post`` then ``take``)."""
        return self.take(self.post(stage, kind, mb, shape, dtype))

    def flush(self) -> None:
        """Wait until every started send has completed."""
        pending, self.pending = self.pending, []
        for work, what, stage, _ in pending:
            try:
                work.wait(timeout=timedelta(seconds=self.timeout))
            except RuntimeError as exc:
                raise self._error(exc, what, stage) from None

    def _error(self, exc: BaseException, what: str, stage: int) -> PeerTimeoutError:
        me = f"pipeline stage {self.place.stage} (rank {self.place.rank})"
        peer = f"stage {stage} (rank {self.place.rank_of(stage)})"
        if "timed out" in str(exc).lower():
            return PeerTimeoutError(
                f"{me}: timed out after {self.timeout:g}s on {what} with {peer}; that "
                "process may be stuck, slower than the timeout (raise --timeout / "
                "CONCORD_TIMEOUT), or built with a different schedule or split"
            )
        return PeerTimeoutError(
            f"{me}: lost {peer} during {what}; that process probably crashed or exited, "
            f"check its log ({first_line(exc)})"
        )


@dataclass(frozen=True)
class PipelineStats:
    """What one ``train_batch`` did on this stage (times are ``time.perf_counter`` seconds).

    ``spans``: every forward/backward with its start and end; ``peak_activation_bytes``: the
    most bytes of activations (saved for backward, or received) held at once.
    """

    microbatches: int
    wall_seconds: float
    compute_seconds: float
    peak_in_flight: int
    peak_activation_bytes: int
    spans: tuple[sched.Span, ...]


class PipelineStage(nn.Module):
    """This rank's stage of a pipelined model; see the module docstring of ``pipeline``."""

    def __init__(
        self,
        layers: Sequence[tuple[str, nn.Module]],
        place: StagePlace,
        microbatches: int,
        schedule: str,
        link: StageLink,
    ) -> None:
        super().__init__()
        for name, module in layers:
            self.add_module(name, module)
        self.place = place
        self.microbatches = microbatches
        self.schedule = schedule
        self.link = link
        self.last_stats: PipelineStats | None = None
        self._plans: dict[int, list[sched.Action]] = {}

    @property
    def stage_index(self) -> int:
        """This process's stage (``Trainer.save`` writes ``model-stage{i}.pt`` per stage)."""
        return self.place.stage

    def extra_repr(self) -> str:
        p = self.place
        return f"stage={p.stage}/{p.stages}, replica={p.replica}/{p.replicas}, {self.schedule}"

    def run_layers(self, x: torch.Tensor) -> torch.Tensor:
        """Apply this stage's layers in order (no communication)."""
        for module in self.children():
            x = module(x)
        return x

    def action_list(self, microbatches: int) -> list[sched.Action]:
        """This stage's actions for a batch of ``microbatches`` micro-batches (cached)."""
        if microbatches not in self._plans:
            fn = sched.SCHEDULES[self.schedule]
            self._plans[microbatches] = fn(self.place.stages, microbatches, self.place.stage)
        return self._plans[microbatches]

    def forward(self, x: torch.Tensor | None) -> torch.Tensor:
        """Inference through the whole pipeline; returns the output on every stage."""
        if torch.is_grad_enabled() and self.training:
            raise UsageError(
                "a pipelined model trains through model.train_batch(x, y, loss_fn); call "
                "model(x) only for inference, under torch.no_grad() or after model.eval()"
            )
        place, link = self.place, self.link
        with torch.no_grad():
            if place.stages == 1:
                return self.run_layers(x)
            h = x if place.is_first else link.recv(place.stage - 1, EVAL_ACT, 0)
            h = self.run_layers(h)
            if not place.is_last:
                link.send(h, place.stage + 1, EVAL_ACT, 0, header=True)
                h = link.recv(place.stages - 1, EVAL_OUT, 0)
            else:
                for stage in range(place.stages - 1):
                    link.send(h, stage, EVAL_OUT, 0, header=True)
            link.flush()
        return h

    def train_batch(
        self,
        x: torch.Tensor | None,
        y: torch.Tensor | None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Forward and backward every micro-batch of ``(x, y)`` per the schedule.

        Gradients accumulate into this stage's parameters as if the unsplit model had run on
        the whole batch; returns that batch loss (0-dim float64) on every stage.
        """
        ref = x if x is not None else y
        if ref is None:
            raise UsageError("train_batch needs x or y on every stage to know the batch size")
        n = len(ref)
        if n == 0:
            raise UsageError("train_batch got an empty batch")
        m = min(self.microbatches, n)
        run = _BatchRun(self, x, y, m, loss_fn)
        for action in self.action_list(m):
            run.do(action)
        self.link.flush()
        loss = self._share_loss(run.total)
        self.last_stats = run.stats()
        return loss

    def _share_loss(self, total: torch.Tensor | None) -> torch.Tensor:
        place = self.place
        if place.is_last:
            loss = total.detach().to(torch.float64).reshape(1)
            for stage in range(place.stages - 1):
                self.link.send(loss.to(self.link.device), stage, LOSS, 0, header=False)
            self.link.flush()
        else:
            loss = self.link.recv(place.stages - 1, LOSS, 0, (1,), torch.float64)
        return loss.cpu().reshape(())


class _BatchRun:
    """Executes one stage's action list for one batch, keeping what backward needs."""

    def __init__(
        self,
        stage: PipelineStage,
        x: torch.Tensor | None,
        y: torch.Tensor | None,
        m: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        self.stage, self.place, self.link = stage, stage.place, stage.link
        self.xs = torch.tensor_split(x, m) if self.place.is_first else None
        self.ys = torch.tensor_split(y, m) if self.place.is_last else None
        base, extra = divmod(len(x if x is not None else y), m)
        self.sizes = [base + (i < extra) for i in range(m)]  # as torch.tensor_split cuts
        self.weights = [size / (base * m + extra) for size in self.sizes]
        self.loss_fn = loss_fn
        self.m = m
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self.total: torch.Tensor | None = None
        self.param_ptrs = {p.data_ptr() for p in stage.parameters()}
        self.mb_bytes: dict[int, int] = {}
        self.held = self.peak_bytes = self.in_flight = self.peak_in_flight = 0
        self.spans: list[sched.Span] = []
        self.started = time.perf_counter()
        self.incoming: dict[tuple[str, int], Incoming] = {}
        self.sample: tuple[torch.Size, torch.dtype] | None = None  # of micro-batch 0
        if not self.place.is_first:  # only micro-batch 0 carries a shape header
            self.incoming[sched.RECV_ACT, 0] = self.link.post(self.place.stage - 1, ACT, 0)

    def do(self, act: sched.Action) -> None:
        mb, peer, link = act.microbatch, act.peer, self.link
        if act.op == sched.RECV_ACT:
            self._recv_act(mb, peer)
        elif act.op == sched.SEND_ACT:
            self._send_act(mb, peer)
        elif act.op == sched.RECV_GRAD:
            self.grads[mb] = link.take(self.incoming.pop((act.op, mb)))
        elif act.op == sched.SEND_GRAD:
            link.send(self.grads.pop(mb), peer, GRAD, mb, header=False)
        elif act.op == sched.FORWARD:
            self._timed(act, self._forward)
        elif act.op == sched.BACKWARD:
            self._timed(act, self._backward)
        else:
            raise AssertionError(f"unknown action {act}")

    def _recv_act(self, mb: int, peer: int) -> None:
        """Take activation ``mb``; after micro-batch 0, post every later one: its shape is
        (micro-batch size, *micro-batch 0's sample shape), so it lands while we compute."""
        h = self.link.take(self.incoming.pop((sched.RECV_ACT, mb)))
        if mb == 0:
            for j in range(1, self.m):
                shape = (self.sizes[j], *h.shape[1:])
                self.incoming[sched.RECV_ACT, j] = self.link.post(peer, ACT, j, shape, h.dtype)
        self.inputs[mb] = h.requires_grad_(h.is_floating_point())

    def _send_act(self, mb: int, peer: int) -> None:
        out = self.outputs[mb]
        if mb == 0:
            self.sample = (out.shape[1:], out.dtype)
        elif out.dim() == 0 or (out.shape[0], out.shape[1:], out.dtype) != (
            self.sizes[mb],
            *self.sample,
        ):
            raise UsageError(
                f"pipeline stage {self.place.stage}: the output of micro-batch {mb} has shape "
                f"{tuple(out.shape)} and dtype {out.dtype}; expected ({self.sizes[mb]}, "
                f"*{tuple(self.sample[0])}) and {self.sample[1]}: a stage's output must keep "
                "the batch as its first dimension and the same per-sample shape"
            )
        self.link.send(out, peer, ACT, mb, header=mb == 0)
        self.incoming[sched.RECV_GRAD, mb] = self.link.post(peer, GRAD, mb, out.shape, out.dtype)

    def _timed(self, act: sched.Action, fn: Callable[[int], None]) -> None:
        start = time.perf_counter()
        fn(act.microbatch)
        self.spans.append(sched.Span(act.op, act.microbatch, start, time.perf_counter()))

    def _forward(self, mb: int) -> None:
        x = self.xs[mb] if self.place.is_first else self.inputs[mb]
        seen: set[int] = set()
        size = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.data_ptr()
            if ptr not in self.param_ptrs and ptr not in seen:
                seen.add(ptr)
                size[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pack(x)
            out = self.stage.run_layers(x)
            if self.place.is_last:
                out = self.loss_fn(out, self.ys[mb]) * self.weights[mb]
                done = out.detach()
                self.total = done if self.total is None else self.total + done
        self.outputs[mb] = out
        self.mb_bytes[mb] = size[0]
        self.held += size[0]
        self.in_flight += 1
        self.peak_bytes = max(self.peak_bytes, self.held)
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _backward(self, mb: int) -> None:
        out = self.outputs.pop(mb)
        grad = None if self.place.is_last else self.grads.pop(mb)
        if out.requires_grad:
            torch.autograd.backward(out, grad)
        if not self.place.is_first:
            x = self.inputs.pop(mb)
            self.grads[mb] = x.grad if x.grad is not None else torch.zeros_like(x)
        self.held -= self.mb_bytes.pop(mb)
        self.in_flight -= 1

    def stats(self) -> PipelineStats:
        compute = sum(s.end - s.start for s in self.spans)
        return PipelineStats(
            microbatches=self.m,
            wall_seconds=time.perf_counter() - self.started,
            compute_seconds=compute,
            peak_in_flight=self.peak_in_flight,
            peak_activation_bytes=self.peak_bytes,
            spans=tuple(self.spans),
        )
