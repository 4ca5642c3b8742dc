"""``Trainer``: fit/evaluate with a progress bar, metrics and checkpoints.

Built only on the user surface (``distribute()``'s model and optimizer), so it works with
every strategy. Rank 0 shows progress, prints a summary per epoch and writes the files. With
a run directory, every epoch ends with ``checkpoint.pt`` (model, optimizer state, epochs
done; one per pipeline stage), which :meth:`Trainer.resume` loads on every worker.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from concord.comm.runtime import Context
from concord.errors import ConcordError, UsageError
from concord.progress import progress
from concord.strategies.base import DataShard
from concord.strategies.ps.config import ParameterServer
from concord.strategies.sparse import clip_grad_norm

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``Trainer(precision=...)``: the autocast dtype (fp16 also scales the loss)
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch measured (written as one JSON line to ``metrics.jsonl``)."""

    epoch: int
    loss: float
    test_accuracy: float | None
    samples_per_s: float
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    """Test-set result, summed over all workers."""

    accuracy: float
    loss: float
    samples: int


class Trainer:
    """Trains a distributed model: ``Trainer(model, opt, loss_fn, ctx, shard).fit(...)``.

    ``max_grad_norm``: clip each step's gradient to that norm after backward, as
    ``clip_grad_norm_`` does (with AllReduce the gradient is already the workers' average; for
    sync parameter servers use ``ParameterServer(max_grad_norm=...)`` instead, which clips the
    average on the servers, and for a pipeline ``Pipeline(max_grad_norm=...)``, which adds up the
    stages' norms).

    ``precision``: ``"fp32"``, ``"bf16"`` (forward and loss under ``torch.autocast`` in
    bfloat16) or ``"fp16"`` (float16 autocast and a ``torch.amp.GradScaler``, whose state the
    checkpoints keep; not for a pipeline stage). Evaluation runs under the same autocast.

    ``lr_scheduler``: a torch LR scheduler on ``optimizer``, stepped after every epoch (or,
    with ``schedule_every="step"``, after every optimizer step); ``ReduceLROnPlateau`` is
    given the epoch's test loss (without a test set its training loss, averaged over the
    workers, so that all take the same rate). The checkpoints keep its state."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        loss_fn: LossFn,
        ctx: Context,
        shard: DataShard | None = None,
        out_dir: str | Path | None = None,
        max_grad_norm: float | None = None,
        precision: str = "fp32",
        lr_scheduler: Any = None,
        schedule_every: str = "epoch",
    ) -> None:
        _check_schedule(lr_scheduler, schedule_every)
        if max_grad_norm is not None and hasattr(model, "train_batch"):
            raise UsageError(
                "max_grad_norm needs the whole model's gradient, and a pipeline stage holds "
                "only its own part: clip with Pipeline(max_grad_norm=...), which adds up every "
                "stage's norm"
            )
        strategy = getattr(optimizer, "strategy", None)
        sync_ps = isinstance(strategy, ParameterServer) and strategy.mode == "sync"
        if max_grad_norm is not None and sync_ps:
            raise UsageError(
                "with ParameterServer(mode='sync') the workers' gradients are averaged on the "
                "servers: clip there with ParameterServer(max_grad_norm=...), not in the "
                "Trainer (which would clip each worker's own gradient)"
            )
        self.model, self.optimizer, self.loss_fn, self.ctx = model, optimizer, loss_fn, ctx
        self.max_grad_norm = max_grad_norm
        self.precision = precision
        self.scaler = self._loss_scaler(precision, strategy)
        self.lr_scheduler, self.schedule_every = lr_scheduler, schedule_every
        self.shard = shard or DataShard(ctx.rank, ctx.world_size)
        self.out_dir = Path(out_dir) if out_dir else None
        self.history: list[EpochMetrics] = []

    def _loss_scaler(self, precision: str, strategy: Any) -> torch.amp.GradScaler | None:
        """fp16's loss scaler (None for fp32 and bf16), after checking ``precision``."""
        if precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if precision != "fp16":
            return None
        if hasattr(self.model, "train_batch"):
            raise UsageError(
                "precision='fp16' scales the loss, which a pipeline stage cannot (train_batch "
                "runs backward itself); use precision='bf16', which needs no loss scaling"
            )
        if isinstance(strategy, ParameterServer) and strategy.overlap:
            raise UsageError(
                "precision='fp16' with ParameterServer(overlap=True): gradients are pushed "
                "during backward, before the loss scale is taken out; use overlap=False"
            )
        return torch.amp.GradScaler(self._device().type)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on one batch (moved to the model's device); returns this
        worker's loss."""
        x, y = self._to_device(x, y)
        self.optimizer.zero_grad()
        stage = hasattr(self.model, "train_batch")  # pipeline stages run their own schedule
        with self._autocast():
            loss = (
                self.model.train_batch(x, y, self.loss_fn)
                if stage
                else self.loss_fn(self.model(x), y)
            )
        if not stage:  # (backward outside autocast, as torch.amp recommends)
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            if self.max_grad_norm is not None:  # (AllReduce: .grad is already the average)
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                clip_grad_norm(self.model.parameters(), self.max_grad_norm)  # (sparse too)
        if self.scaler is None:
            self.optimizer.step()
        else:  # no update where the gradient overflowed (per strategy: see the README)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)

    def _autocast(self) -> torch.autocast:
        """``precision``'s autocast on the model's device (disabled for fp32)."""
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self._device().type, dtype=dtype, enabled=dtype is not None)

    def fit(
        self, train: Iterable, epochs: int, test: Iterable | None = None, start_epoch: int = 0
    ) -> list[EpochMetrics]:
        """Train until ``epochs`` epochs are done (from ``start_epoch``, e.g. what
        :meth:`resume` returned); evaluate on ``test`` and write a checkpoint after each."""
        for epoch in range(start_epoch, epochs):
            _set_epoch(train, epoch)
            self.model.train()
            steps = self.steps_per_epoch(train)
            start, total, count, samples = time.perf_counter(), 0.0, 0, 0
            bar = progress(
                itertools.islice(train, steps),
                self.ctx.is_main,
                desc=f"epoch {epoch + 1}/{epochs}",
                unit="batch",
                total=steps,
            )
            for x, y in bar:
                loss = self.train_step(x, y)
                if self.lr_scheduler is not None and self.schedule_every == "step":
                    self.lr_scheduler.step()
                total, count, samples = total + loss, count + 1, samples + len(y)
                if count % 20 == 0 and hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            seconds = time.perf_counter() - start
            result = self.evaluate(test) if test is not None else None
            metrics = EpochMetrics(
                epoch=epoch + 1,
                loss=total / max(count, 1),
                test_accuracy=result.accuracy if result else None,
                samples_per_s=samples * self.shard.world / seconds,
                seconds=seconds,
            )
            self.history.append(metrics)
            if self.lr_scheduler is not None and self.schedule_every == "epoch":
                self._schedule_epoch(result.loss if result else metrics.loss, result is None)
            self.save_checkpoint(epoch + 1)  # (before the metrics line: see resume)
            self._report(metrics)
        return self.history

    def _schedule_epoch(self, loss: float, own: bool) -> None:
        """Step an epoch's LR schedule; ``ReduceLROnPlateau`` watches ``loss``, which, when it
        is this worker's ``own`` training loss, is averaged over the workers first (every
        worker must take the same rate)."""
        if not isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.lr_scheduler.step()
            return
        total = torch.tensor([loss], dtype=torch.float64)
        if own and self._all_reduce(total):
            loss = float(total) / self.ctx.world_size
        self.lr_scheduler.step(loss)

    def steps_per_epoch(self, train: Iterable) -> int | None:
        """Steps every worker takes this epoch: the fewest batches any worker has.

        Shards may differ by a sample, and so by a batch; a worker that stepped once more
        than the others would wait forever in a collective (PyTorch DDP has the same hazard
        with uneven inputs). The extra samples of larger shards come back in later epochs'
        shuffles. None (no limit) for a loader without ``len()``.
        """
        if not hasattr(train, "__len__"):
            return None
        steps = torch.tensor([len(train)], dtype=torch.int64)
        self._all_reduce(steps, dist.ReduceOp.MIN)
        return int(steps)

    @torch.no_grad()
    def evaluate(self, test: Iterable) -> Evaluation:
        """Accuracy and mean loss over the test set, summed across the data-parallel shards."""
        self.model.eval()
        stats = torch.zeros(3, dtype=torch.float64)  # correct, loss sum, samples
        for x, y in test:
            x, y = self._to_device(x, y)
            with self._autocast():  # (as training runs, and as HF's Trainer evaluates)
                out = self.model(x)
                loss = float(self.loss_fn(out, y))
            stats += torch.tensor(
                [(out.argmax(1) == y).sum().item(), loss * len(y), len(y)], dtype=torch.float64
            )
        if self._all_reduce(stats):
            stats /= self.ctx.world_size // self.shard.world  # stages of one replica count once
        correct, loss_sum, n = stats.tolist()
        return Evaluation(accuracy=correct / max(n, 1), loss=loss_sum / max(n, 1), samples=int(n))

    def _report(self, metrics: EpochMetrics) -> None:
        """Print an epoch's summary and append it to ``metrics.jsonl`` (rank 0)."""
        if not self.ctx.is_main:
            return
        acc = "n/a" if metrics.test_accuracy is None else f"{metrics.test_accuracy:.4f}"
        print(
            f"epoch {metrics.epoch}: loss={metrics.loss:.4f} test_accuracy={acc} "
            f"samples/s={metrics.samples_per_s:,.0f} time={metrics.seconds:.1f}s",
            flush=True,
        )
        if self.out_dir:
            self._write_metrics([metrics], "a")

    def _write_metrics(self, history: list[EpochMetrics], mode: str) -> None:
        """Append (``mode`` "a") or write anew ("w") ``metrics.jsonl``, a JSON line an epoch."""
        assert self.out_dir is not None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", mode) as fh:
            fh.writelines(json.dumps(asdict(m)) + "\n" for m in history)

    def save(self, name: str = "model.pt") -> Path | None:
        """Write the model's state dict to the run directory (rank 0 of each stage)."""
        path = self._writer_path(name)
        if path is not None:
            _save(self._module().state_dict(), path)
        return path

    def save_checkpoint(self, epochs_done: int, name: str = "checkpoint.pt") -> Path | None:
        """Write the model, the optimizer state (a parameter server's comes from its servers),
        ``epochs_done`` and the metrics history to the run directory (rank 0 of each stage),
        for :meth:`resume`."""
        path = self._writer_path(name)
        if path is not None:
            state = {"model": self._module().state_dict(), "optimizer": self.optimizer.state_dict()}
            if self.scaler is not None:  # (fp16: the loss scale goes on where it was)
                state["scaler"] = self.scaler.state_dict()
            if self.lr_scheduler is not None:
                state["lr_scheduler"] = self.lr_scheduler.state_dict()
            history = [asdict(m) for m in self.history]
            _save({"epochs_done": epochs_done, "history": history, **state}, path)
        return path

    def resume(self, path: str | Path) -> int:
        """Load a checkpoint of :meth:`save_checkpoint` and return the epochs it had done, for
        ``fit(..., start_epoch=...)``. Every worker calls it before training (the file must be
        visible to all, e.g. a shared folder); pipeline stages read their stage's file, and
        files that disagree on the epochs done (a stage died between two writes) are refused.
        The history comes back too, and rank 0 rewrites ``metrics.jsonl`` from it."""
        path = Path(path)
        path = path.with_name(self._staged(path.name))
        if not path.is_file():
            raise FileNotFoundError(f"worker {self.ctx.rank}: no checkpoint at {path}")
        # tensors and plain values, no code; on the CPU, so that a GPU run's checkpoint loads
        # anywhere (load_state_dict copies into the parameters wherever they are)
        state = torch.load(path, map_location="cpu", weights_only=True)
        done = int(state["epochs_done"])
        low, high = self._range(done)
        if low != high:
            raise ConcordError(
                f"worker {self.ctx.rank}: the checkpoints the workers read were written after "
                f"{low} to {high} epochs ({path} after {done}); resume from one set"
            )
        self._module().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.history = [EpochMetrics(**h) for h in state.get("history", [])]
        if self.ctx.is_main and self.out_dir:  # exactly the epochs the checkpoint had done,
            self._write_metrics(self.history, "w")  # none twice, none lost
        return done

    def resume_latest(self) -> int:
        """After a restart (``concord run --max-restarts``: ``CONCORD_ATTEMPT`` > 0), resume
        from this run directory's ``checkpoint.pt`` if an earlier attempt wrote one; return
        the epochs done (0 on the first attempt or with no checkpoint). Every worker calls it."""
        if self.out_dir is None or self.ctx.attempt == 0:
            return 0
        path = self.out_dir / "checkpoint.pt"
        found = int(path.with_name(self._staged(path.name)).is_file())
        low, high = self._range(found)
        if not high:
            return 0
        if not low:
            raise ConcordError(
                f"worker {self.ctx.rank}: some workers cannot see {path} (a shared folder?)"
            )
        return self.resume(path)

    def _range(self, value: int) -> tuple[int, int]:
        """The least and the greatest ``value`` over all workers (a collective)."""
        both = torch.tensor([-value, value], dtype=torch.int64)
        self._all_reduce(both, dist.ReduceOp.MAX)
        return -int(both[0]), int(both[1])

    def _all_reduce(self, tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> bool:
        """``dist.all_reduce(tensor, op)`` over all workers, in place; False (``tensor`` left
        as it is) in a single process."""
        if not dist.is_initialized() or self.ctx.world_size == 1:
            return False
        dist.all_reduce(tensor, op=op)
        return True

    def _module(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def _device(self) -> torch.device:
        """The device of the model's parameters (the CPU for none)."""
        first = next(self._module().parameters(), None)
        return torch.device("cpu") if first is None else first.device

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` and ``y`` on the device of the model's parameters (loaders yield CPU ones)."""
        device = self._device()
        if device.type == "cpu":
            return x, y
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def _writer_path(self, name: str) -> Path | None:
        """Where this worker writes ``name``, or None if another one does."""
        if self.out_dir is None or self.shard.rank != 0:
            return None
        stage = getattr(self.model, "stage_index", None)
        if stage is None and not self.ctx.is_main:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / self._staged(name)

    def _staged(self, name: str) -> str:
        """``name`` for this worker's pipeline stage (``checkpoint-stage1.pt``), else as is."""
        stage = getattr(self.model, "stage_index", None)
        return name if stage is None else name.replace(".pt", f"-stage{stage}.pt")


def _check_schedule(scheduler: Any, every: str) -> None:
    if every not in ("epoch", "step"):
        raise UsageError(f"schedule_every must be 'epoch' or 'step', got {every!r}")
    if scheduler is None:
        return
    if not callable(getattr(scheduler, "step", None)) or not hasattr(scheduler, "state_dict"):
        raise UsageError(
            f"lr_scheduler must be a torch LR scheduler (torch.optim.lr_scheduler), got "
            f"{type(scheduler).__name__}"
        )
    if every == "step" and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise UsageError("ReduceLROnPlateau watches an epoch's loss: use schedule_every='epoch'")


def _save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file, so a crash never leaves half a file."""
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def _set_epoch(loader: Any, epoch: int) -> None:
    """Reshuffle a loader for ``epoch`` (loaders with set_epoch, or a sampler that has it)."""
    for target in (loader, getattr(loader, "sampler", None)):
        if hasattr(target, "set_epoch"):
            target.set_epoch(epoch)
            return
