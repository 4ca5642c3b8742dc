"""Parameter-server update rules, pure: sync gradient rounds, the staleness (SSP) clock, and
the global-norm clipping coefficient.

The first two are plain state machines over tensors and worker ids; the server process
(:mod:`concord.strategies.ps.shard_server`) feeds them messages and sends what they decide.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from concord.algorithms.row_grads import RowGrad


@dataclass(frozen=True)
class RoundResult:
    """A finished sync step: the averaged gradients and who contributed.

    ``grads`` has one entry per key pushed (a :class:`RowGrad` where every contributor
    pushed rows); ``absent`` names the pieces that no contributor had a gradient for (the
    optimizer skips them, as in one process); ``rows`` gives, for each key every contributor
    pushed as rows, the rows any of them touched (sorted, unique).
    """

    step: int
    contributors: tuple[int, ...]
    grads: dict[str, torch.Tensor | RowGrad]
    absent: frozenset[str] = frozenset()
    rows: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SyncAggregator:
    """One shard's synchronous rounds: wait for ``len(live) - backup_workers`` gradients.

    ``push`` reads the gradient tensors only while it runs (they may be views of a receive
    buffer): each key's running sum is this aggregator's own buffer, reused from round to
    round, except that a push which alone fills its round (``needed`` is 1) is kept as it
    came, not copied: call ``finish`` before its tensors die (a server does, at once). It
    returns ``"counted"``, ``"complete"`` (this push filled the round; call ``finish``) or
    ``"late"`` (a gradient for an old step: dropped and recorded in ``dropped``). The
    averages ``finish`` returns live in those buffers (or that push): use them before the
    next round's first push. Missing gradients of a contributor count as zero in the
    average, which equals one process computing the mean loss over the global batch: a push
    either leaves a key out or sends zeros for it and names it in ``absent``. A sparse
    gradient may come as a :class:`~concord.algorithms.row_grads.RowGrad`: while every push of
    a key is rows, the average is rows too (:meth:`RowGrad.merged
    <concord.algorithms.row_grads.RowGrad.merged>`, each row once); a dense push of the key
    turns it into a dense sum with the rows added where they fall.
    """

    workers: int
    backup_workers: int = 0
    version: int = 0
    live: set[int] = field(default_factory=set)
    dropped: list[tuple[int, int]] = field(default_factory=list)
    _sums: dict[str, torch.Tensor] = field(default_factory=dict)
    _buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    _contributors: list[int] = field(default_factory=list)
    _absent: frozenset[str] = frozenset()
    _row_parts: dict[str, list[RowGrad]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.workers < 1 or not 0 <= self.backup_workers < self.workers:
            raise ValueError(
                f"need workers >= 1 and 0 <= backup_workers < workers, got workers="
                f"{self.workers}, backup_workers={self.backup_workers}"
            )
        self.live = self.live or set(range(self.workers))

    @property
    def needed(self) -> int:
        """Gradients that complete the current round."""
        return max(1, len(self.live) - self.backup_workers)

    @property
    def contributors(self) -> tuple[int, ...]:
        return tuple(self._contributors)

    @property
    def complete(self) -> bool:
        return len(self._contributors) >= self.needed

    def missing(self) -> list[int]:
        """Live workers that have not pushed this round."""
        return sorted(self.live - set(self._contributors))

    def push(
        self,
        worker: int,
        step: int,
        grads: Mapping[str, torch.Tensor | RowGrad],
        absent: frozenset[str] = frozenset(),
    ) -> str:
        if step < self.version:
            self.dropped.append((worker, step))
            return "late"
        if step > self.version:
            raise ValueError(
                f"worker {worker} pushed a gradient for step {step} but this shard is at "
                f"version {self.version}; a worker must pull before it pushes again"
            )
        if worker in self._contributors:
            raise ValueError(f"worker {worker} pushed twice for step {step}")
        alone = not self._contributors and self.needed == 1  # this push ends the round
        self.live.add(worker)
        self._absent = self._absent & absent if self._contributors else absent
        self._contributors.append(worker)
        for key, grad in grads.items():
            total = self._sums.get(key)
            if isinstance(grad, RowGrad):  # a sparse gradient's rows
                if total is None:  # (copied: it may view a receive buffer)
                    self._row_parts.setdefault(key, []).append(grad.copy())
                else:
                    grad.add_to(total)
                continue
            if total is not None:
                total.add_(grad)
            elif alone:  # (finish() divides nothing: one contributor)
                total = self._sums[key] = grad
            else:
                total = self._sums[key] = self._buffer(key, grad.shape, grad.dtype).copy_(grad)
            for part in self._row_parts.pop(key, []):  # rows pushed before: added where they fall
                part.add_to(total)
        return "complete" if self.complete else "counted"

    def _buffer(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """The reusable sum buffer of ``key``."""
        total = self._buffers.get(key)
        if total is None or total.shape != tuple(shape) or total.dtype != dtype:
            total = self._buffers[key] = torch.empty(tuple(shape), dtype=dtype)
        return total

    def finish(self) -> RoundResult:
        """Average the round's gradients, advance the version, start the next round."""
        if not self._contributors:
            raise ValueError(f"step {self.version} has no gradients to average")
        count = len(self._contributors)
        grads: dict[str, torch.Tensor | RowGrad] = {
            key: total.div_(count) if count > 1 else total for key, total in self._sums.items()
        }
        for key, parts in self._row_parts.items():
            merged = grads[key] = RowGrad.merged(parts)
            if count > 1:
                merged.values.div_(count)
        rows = {key: g.rows for key, g in grads.items() if isinstance(g, RowGrad)}
        result = RoundResult(self.version, tuple(self._contributors), grads, self._absent, rows)
        self.version += 1
        self._sums, self._contributors, self._row_parts = {}, [], {}
        return result

    def remove(self, worker: int) -> bool:
        """Stop waiting for ``worker`` (it left or was lost); True if the round is now full."""
        self.live.discard(worker)
        return bool(self._contributors) and self.complete


class StalenessClock:
    """Stale synchronous parallel: a worker may run at most ``max_staleness`` steps ahead.

    ``clock[w]`` counts worker ``w``'s pushes. After a push, ``w`` may start its next step
    only while ``clock[w] - min(clock of live workers) <= max_staleness``; with 0 every
    worker waits for the slowest at each step (lockstep, like sync). ``None`` never blocks.
    """

    def __init__(self, workers: Iterable[int], max_staleness: int | None) -> None:
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be None or >= 0, got {max_staleness}")
        self.max_staleness = max_staleness
        self.clock = {w: 0 for w in workers}

    def tick(self, worker: int) -> int:
        """Record one push by ``worker`` (a worker seen for the first time joins at 0)."""
        self.clock[worker] = self.clock.get(worker, 0) + 1
        return self.clock[worker]

    def slowest(self) -> tuple[int, int]:
        """``(worker, clock)`` of the live worker furthest behind."""
        if not self.clock:
            return (-1, 0)
        worker = min(self.clock, key=lambda w: (self.clock[w], w))
        return worker, self.clock[worker]

    def lead(self, worker: int) -> int:
        """How many steps ``worker`` is ahead of the slowest live worker."""
        return self.clock.get(worker, 0) - self.slowest()[1]

    def may_proceed(self, worker: int) -> bool:
        return self.max_staleness is None or self.lead(worker) <= self.max_staleness

    def remove(self, worker: int) -> None:
        """Forget ``worker`` (it finished or was lost) so it no longer holds others back."""
        self.clock.pop(worker, None)


def clip_coefficient(sums_of_squares: Sequence[float], max_norm: float) -> float:
    """What ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` scales gradients by, from the
    squared norms of their parts (one per shard): ``min(1, max_norm / (norm + 1e-6))``."""
    norm = math.sqrt(math.fsum(sums_of_squares))
    return min(1.0, max_norm / (norm + 1e-6))
