"""The gradient reducer behind ``AllReduce``: buckets launched from autograd hooks, two engines.

Each trainable parameter gets a post-accumulate-grad hook. When every parameter of a bucket
has its gradient, the bucket is launched (buckets strictly in plan order, so every worker
issues the same collectives in the same order); at the end of backward the buckets still
waiting (parameters this worker did not use) are launched too and all are awaited, so
``.grad`` is final when ``backward()`` returns (grad clipping works, as with DDP). A step with
no backward on this worker is finished by ``optimizer.step()``.

Engines reduce one bucket's flat buffer (layout in ``concord.algorithms.buckets``):
``TorchEngine`` with ``torch.distributed.all_reduce`` (gloo/nccl, asynchronous), and
``RingEngine`` with concord's ring over shared memory, run by one background thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from concord.algorithms.buckets import Bucket, BucketPlan
from concord.algorithms.codecs import CastCodec, PowerSGD, PowerSGDState
from concord.algorithms.ring import ring_allreduce
from concord.comm.shm import ShmRing
from concord.errors import PeerTimeoutError, UsageError
from concord.strategies.sparse import average_sparse_grads

Fill = Callable[[torch.Tensor], None]
Unpack = Callable[[torch.Tensor, bool], None]


class LowRank:
    """PowerSGD on one bucket's flat buffer: matrices low-rank in place, the rest summed as is.

    ``sum_(flat)`` sums a 1-D tensor across workers in place (the engine's allreduce).
    """

    def __init__(
        self,
        bucket: Bucket,
        shapes: Sequence[torch.Size],
        codec: PowerSGD,
        dtype: torch.dtype,
        world: int,
        device: torch.device,
    ) -> None:
        self.world = world
        self.mats, self.plain, dims = [], [], []
        for slot, shape in zip(bucket.slots, shapes):
            if codec.compresses(tuple(shape)):
                n = shape[0]
                self.mats.append((slot.offset, n, slot.numel // n))
                dims.append((n, slot.numel // n))
            else:
                self.plain.append((slot.offset, slot.numel))
        self.grad_numel = sum(k for _, k in self.plain)
        self.plain.append((bucket.grad_numel, len(bucket.slots)))  # presence flags: a sum
        self.state = PowerSGDState(dims, codec.rank, 7919 + bucket.index, dtype, device)

    def reduce_(self, flat: torch.Tensor, sum_: Callable[[torch.Tensor], None]) -> None:
        rest = torch.cat([flat[a : a + k] for a, k in self.plain])
        sum_(rest)
        rest[: self.grad_numel].div_(self.world)
        offset = 0
        for a, k in self.plain:
            flat[a : a + k].copy_(rest[offset : offset + k])
            offset += k
        mats = [flat[a : a + n * m].view(n, m) for a, n, m in self.mats]
        self.state.reduce_(mats, lambda t: (sum_(t), t.div_(self.world)))


class TorchEngine:
    """Buckets reduced by ``torch.distributed.all_reduce`` (asynchronous work handles)."""

    name = "torch"

    def __init__(
        self,
        plan: BucketPlan,
        dtypes: Sequence[torch.dtype],
        device: torch.device,
        codec: CastCodec | None,
        world: int,
        timeout: float,
    ) -> None:
        self.world, self.timeout, self.codec = world, timeout, codec
        self.flat_device = device
        self.flat = [
            torch.empty(b.numel, dtype=dt, device=device) for b, dt in zip(plan.buckets, dtypes)
        ]
        self.wire = [f if codec is None else f.to(codec.wire_for(f.dtype)) for f in self.flat]
        self.low_rank: dict[int, LowRank] = {}

    def start(self, bucket: Bucket, fill: Fill, unpack: Unpack) -> Callable[[], None]:
        flat, wire = self.flat[bucket.index], self.wire[bucket.index]
        fill(flat)
        if bucket.index in self.low_rank:  # two dependent rounds: done here, synchronously
            self.low_rank[bucket.index].reduce_(flat, dist.all_reduce)
            return lambda: unpack(flat, True)
        if wire is not flat:
            flat[: bucket.grad_numel].div_(self.world)
            wire.copy_(flat)
        work = dist.all_reduce(wire, async_op=True)

        def wait() -> None:
            self._wait(work, f"bucket {bucket.index} ({bucket.numel} elements)")
            if wire is not flat:
                flat.copy_(wire)
            unpack(flat, wire is not flat)

        return wait

    def sum_now(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over every worker in place, now (the sparse gradients' sums; gloo
        sums a sparse tensor itself: see :attr:`sum_sparse`)."""
        self._wait(dist.all_reduce(tensor, async_op=True), f"a {list(tensor.shape)} tensor")
        return tensor

    def _wait(self, work: dist.Work, what: str) -> None:
        try:
            work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise PeerTimeoutError(
                f"allreduce of {what} did not complete within {self.timeout:g}s: a worker is "
                f"missing or failed ({exc})"
            ) from None

    @property
    def sum_sparse(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """On the CPU, gloo's all_reduce of a sparse tensor (DDP's path: faster there than the
        two dense sums); nccl has none."""
        return self.sum_now if self.flat_device.type == "cpu" else None

    def close(self) -> None:
        pass


class _Job:
    """A bucket reduction that runs once, on the engine's thread or on the waiting thread."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn, self.future, self._taken = fn, Future(), threading.Lock()

    def run_once(self) -> bool:
        """Run the job unless another thread took it; True if this call ran it."""
        if not self._taken.acquire(blocking=False):
            return False
        try:
            self.fn()
            self.future.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self.future.set_exception(exc)
        return True


class RingEngine:
    """Buckets reduced by concord's ring over shared memory, on one background thread."""

    name = "ring"
    sum_sparse = None  # sparse gradients: a row mask, then the rows, through sum_now

    def __init__(
        self,
        plan: BucketPlan,
        dtypes: Sequence[torch.dtype],
        ring: ShmRing,
        codec: CastCodec | None,
        world: int,
        chunk_bytes: int,
    ) -> None:
        self.ring, self.world, self.codec = ring, world, codec
        self.regions, self.acc, self.chunks, self.offsets = [], [], [], []
        self.low_rank: dict[int, LowRank] = {}
        self.chunk_bytes = chunk_bytes
        offset = 0
        for bucket, dtype in zip(plan.buckets, dtypes):
            wire_dtype = dtype if codec is None else codec.wire_for(dtype)
            self.offsets.append(offset)
            self.regions.append(ring.region(offset, bucket.numel, wire_dtype))
            size = torch.empty((), dtype=wire_dtype).element_size()
            offset += -(-bucket.numel * size // 64) * 64
            self.acc.append(torch.empty(bucket.numel, dtype=dtype))
            self.chunks.append(max(1, chunk_bytes // size))
        self.scratch = offset  # after the buckets: sum_now's region (see wire_bytes)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="concord-ring", daemon=True)
        self._thread.start()

    @staticmethod
    def wire_bytes(
        plan: BucketPlan,
        dtypes: Sequence[torch.dtype],
        codec: CastCodec | None,
        scratch_bytes: int = 0,
    ) -> int:
        """The wire's size: every bucket, then ``scratch_bytes`` for :meth:`sum_now`."""
        total = 0
        for bucket, dtype in zip(plan.buckets, dtypes):
            wire_dtype = dtype if codec is None else codec.wire_for(dtype)
            total += -(-bucket.numel * torch.empty((), dtype=wire_dtype).element_size() // 64) * 64
        return max(total + scratch_bytes, 64)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if not job.run_once():  # the waiting thread took it: let it finish first
                wait_futures([job.future])

    def _reduce(self, bucket: Bucket, fill: Fill, unpack: Unpack) -> None:
        acc = self.acc[bucket.index]
        fill(acc)
        if bucket.index in self.low_rank:
            self.low_rank[bucket.index].reduce_(acc, lambda t: self._sum(bucket.index, t))
            unpack(acc, True)
            return
        if self.codec is not None:
            acc[: bucket.grad_numel].div_(self.world)
        result = ring_allreduce(self.regions[bucket.index], acc, self.chunks[bucket.index])
        unpack(result, self.codec is not None)

    def _sum(self, index: int, flat: torch.Tensor) -> None:
        """Sum ``flat`` (no longer than bucket ``index``) across the ring, in place."""
        region = self.ring.region(self.offsets[index], flat.numel(), flat.dtype)
        flat.copy_(ring_allreduce(region, flat, self.chunks[index]))

    def sum_now(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum ``flat`` over the ring in place, now, in the scratch region after the buckets
        (the sparse gradients' sums; no bucket is in flight when they run)."""
        region = self.ring.region(self.scratch, flat.numel(), flat.dtype)
        chunk = max(1, self.chunk_bytes // flat.element_size())
        return flat.copy_(ring_allreduce(region, flat, chunk))

    def start(self, bucket: Bucket, fill: Fill, unpack: Unpack) -> Callable[[], None]:
        job = _Job(lambda: self._reduce(bucket, fill, unpack))
        self._jobs.put(job)

        def wait() -> None:
            job.run_once()  # not started yet: run it here rather than wait for a thread switch
            limit = self.ring.timeout * 2 + 5
            try:
                job.future.result(timeout=limit)
            except FutureTimeout:
                raise PeerTimeoutError(
                    f"worker rank {self.ring.rank}: the ring allreduce of bucket {bucket.index} "
                    f"did not finish within {limit:g}s; a peer stopped taking part (did every "
                    "worker run the same number of steps?)"
                ) from None

        return wait

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)
        self.ring.close()


class Reducer:
    """Hooks on ``params`` that launch bucket reductions; ``finish()`` ends a step's sync."""

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        plan: BucketPlan,
        engine,
        world: int,
        sparse: Sequence[nn.Parameter] = (),
    ) -> None:
        self.params, self.plan, self.engine, self.world = list(params), plan, engine, world
        self.sparse = list(sparse)  # embedding weights: not in buckets, see finish()
        self.enabled = True  # False inside no_sync()
        self._synced = False  # a backward of this step already finished the reduction
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)
        ] + [p.register_post_accumulate_grad_hook(self._sparse_hook) for p in self.sparse]
        self._reset()

    def _reset(self) -> None:
        self._pending = [len(b.slots) for b in self.plan.buckets]
        self._seen = bytearray(len(self.params))
        self._waits: list[Callable[[], None] | None] = [None] * len(self.plan.buckets)
        self._next = 0
        self._callback_queued = False

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(_param: torch.Tensor) -> None:
            if self.enabled:
                self._ready(index)
            else:  # a local gradient after this step's reduction: step() must reduce again
                self._synced = False

        return hook

    def _sparse_hook(self, _param: torch.Tensor) -> None:
        if self.enabled:
            self._queue_finish()
        else:
            self._synced = False

    def _queue_finish(self) -> None:
        if not self._callback_queued:
            self._callback_queued, self._synced = True, False
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)

    def _ready(self, index: int) -> None:
        bucket = self.plan.bucket_of[index]
        if self._waits[bucket] is not None:
            raise UsageError(
                f"parameter {index} got a second gradient in one backward pass, after its "
                f"bucket {bucket} was launched (a reentrant backward, e.g. activation "
                "checkpointing with use_reentrant=True); use use_reentrant=False"
            )
        self._queue_finish()
        if not self._seen[index]:
            self._seen[index] = 1
            self._pending[bucket] -= 1
            while self._next < len(self._pending) and self._pending[self._next] == 0:
                self._launch(self._next)

    def _launch(self, index: int) -> None:
        bucket = self.plan.buckets[index]
        self._waits[index] = self.engine.start(bucket, self._filler(bucket), self._unpacker(bucket))
        self._next = index + 1

    def finish(self) -> None:
        """Launch the buckets still waiting, wait for all, leave the global grads in place.

        Runs at the end of every synchronized backward (an autograd callback).
        """
        while self._next < len(self.plan.buckets):
            self._launch(self._next)
        try:
            for wait in self._waits:
                wait()
            # after every bucket, so all workers issue the same collectives in the same order
            average_sparse_grads(
                self.sparse, self.world, self.engine.sum_now, self.engine.sum_sparse
            )
        finally:
            self._reset()
        self._synced = True

    def synchronize(self) -> None:
        """Called by ``optimizer.step()``: finish this step's reduction unless a backward did.

        A worker with no synchronized backward in this step (no data, or only ``no_sync``
        passes) still takes part, so every worker issues the same collectives.
        """
        if not self._synced:
            self.finish()
        self._synced = False

    def _filler(self, bucket: Bucket) -> Fill:
        def fill(out: torch.Tensor) -> None:
            flags = []
            for slot in bucket.slots:
                grad = self.params[slot.param].grad
                view = out[slot.offset : slot.offset + slot.numel]
                if grad is None:
                    view.zero_()
                    flags.append(0.0)
                elif grad.is_sparse:
                    raise UsageError(
                        f"parameter {slot.param} got a sparse gradient, but AllReduce reduces "
                        "sparse gradients only for the weights of nn.Embedding and "
                        "nn.EmbeddingBag(sparse=True)"
                    )
                else:
                    view.copy_(grad.reshape(-1))
                    flags.append(1.0)
            out[bucket.grad_numel :].copy_(torch.tensor(flags, dtype=out.dtype))

        return fill

    def _unpacker(self, bucket: Bucket) -> Unpack:
        def unpack(flat: torch.Tensor, divided: bool) -> None:
            present = flat[bucket.grad_numel :].tolist()
            for slot, count in zip(bucket.slots, present):
                if count <= 0:
                    continue  # no worker had a gradient: grad stays None, as in one process
                param = self.params[slot.param]
                view = flat[slot.offset : slot.offset + slot.numel].view(param.shape)
                if param.grad is None:
                    grad = view.to(param.dtype, copy=True)
                    param.grad = grad if divided else grad.div_(self.world)
                elif divided:
                    param.grad.copy_(view)
                else:
                    torch.div(view, self.world, out=param.grad)

        return unpack

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self.engine.close()


def check_engine_device(engine: str, device: torch.device) -> None:
    """The ring engine works on host memory only."""
    if engine == "ring" and device.type != "cpu":
        raise UsageError(
            f'AllReduce(engine="ring") reduces host memory, but the model is on {device}; '
            'use engine="torch" (nccl) on GPUs, or engine="auto"'
        )
