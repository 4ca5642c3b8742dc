"""The user surface: ``init()``, ``distribute()``, ``shutdown()``.

import concord
ctx = concord.init()
model, opt = concord.distribute(model, opt, concord.AllReduce())
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from concord.algorithms.multi_optimizer import as_optimizer
from concord.comm.runtime import Context, current, shutdown
from concord.comm.runtime import init as _init
from concord.strategies.base import Distributed, Strategy

__all__ = ["Context", "distribute", "init", "shutdown"]


def init(timeout: float | None = None, backend: str | None = None) -> Context:
    """Join the job described by the environment (see ``concord.comm.rendezvous``).

    With no env at all this is a single process (world 1). A missing peer ends the call
    within ``timeout`` seconds (default: $CONCORD_TIMEOUT or 300) with an error naming it.
    """
    return _init(timeout=timeout, backend=backend)


def distribute(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    strategy: Strategy | None = None,
    ctx: Context | None = None,
) -> Distributed:
    """Wrap ``model`` and ``optimizer`` for ``strategy`` (default: ``AllReduce()``).

    Returns ``(model, optimizer)``; the optimizer keeps the torch.optim surface and its
    ``step()`` synchronizes with the other workers first. A list of optimizers over disjoint
    parameters (e.g. ``[SparseAdam(table), Adam(rest)]``) becomes one
    :class:`~concord.algorithms.multi_optimizer.MultiOptimizer`, wrapped as one.
    """
    if strategy is None:
        from concord.strategies.allreduce import AllReduce

        strategy = AllReduce()
    if not isinstance(strategy, Strategy):
        raise TypeError(
            f"strategy must be a concord strategy such as concord.AllReduce(), "
            f"got {type(strategy).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ctx = ctx or current() or init()
    return strategy.distribute(model, as_optimizer(optimizer), ctx)
