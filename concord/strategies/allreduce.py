"""AllReduce data parallelism: every worker averages gradients with every other, no server.

Simplest correct form: broadcast parameters and buffers from rank 0 at wrap time, then
average each gradient with ``torch.distributed.all_reduce`` before the optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from concord.strategies.base import Distributed, DistributedOptimizer, Strategy

if TYPE_CHECKING:
    from concord.comm.runtime import Context


@dataclass(frozen=True)
class AllReduce(Strategy):
    """Decentralized data parallelism: gradients averaged by allreduce across workers."""

    name = "allreduce"

    def distribute(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context
    ) -> Distributed:
        broadcast_state(model)
        return Distributed(model, AllReduceOptimizer(optimizer, ctx.world_size))


def broadcast_state(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every worker."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src)


class AllReduceOptimizer(DistributedOptimizer):
    """Averages every gradient across workers in ``synchronize()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, world_size: int) -> None:
        super().__init__(optimizer)
        self.world_size = world_size

    def synchronize(self) -> None:
        if self.world_size == 1:
            return
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad.div_(self.world_size)
