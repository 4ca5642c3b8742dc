"""What every strategy shares: the ``Strategy`` interface and the wrapped optimizer.

A strategy is a frozen, validated dataclass; ``distribute`` turns a model and a
``torch.optim`` optimizer into their distributed counterparts. The wrapped optimizer keeps
the torch.optim surface by composition and adds ``synchronize()``; its class derives from
``torch.optim.Optimizer`` (statically: nothing is subclassed at run time), so torch's LR
schedulers, which check ``isinstance``, take it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from concord.errors import UsageError

if TYPE_CHECKING:
    from concord.comm.runtime import Context


def model_device(params: list[torch.Tensor]) -> torch.device:
    """The one device that holds all of ``params`` (the CPU for none)."""
    devices = sorted({str(p.device) for p in params})
    if len(devices) > 1:
        raise UsageError(
            f"concord trains a model (or a pipeline stage) on one device, but its parameters "
            f"are on {devices}; move the whole model first: model.to(ctx.device)"
        )
    return params[0].device if params else torch.device("cpu")


def positive_or_none(name: str, value: Any) -> None:
    """Check an optional setting such as ``max_grad_norm``: None, or a positive finite number."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number or None, got {value!r}")
    if not 0 < value < math.inf:
        raise UsageError(f"{name} must be positive and finite, got {value}")


class Distributed(NamedTuple):
    """What ``concord.distribute`` returns: unpack as ``model, opt = ...``."""

    model: nn.Module
    optimizer: DistributedOptimizer


class DataShard(NamedTuple):
    """Which data-parallel shard a worker reads: ``rank`` of ``world`` replicas."""

    rank: int
    world: int


class Strategy(ABC):
    """Base of the strategy dataclasses."""

    #: short name used by ``concord train --strategy`` and in logs
    name: str = "strategy"

    def data_shard(self, ctx: Context) -> DataShard:
        """The data shard this worker reads (every worker its own, unless overridden)."""
        return DataShard(ctx.rank, ctx.world_size)

    @abstractmethod
    def distribute(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context
    ) -> Distributed:
        """Wrap ``model`` and ``optimizer`` for this strategy on the process ``ctx``."""


class DistributedOptimizer(torch.optim.Optimizer):
    """A torch optimizer wrapped by composition; ``step()`` synchronizes first.

    It subclasses ``torch.optim.Optimizer`` only to be one to ``isinstance`` (torch's LR
    schedulers check it): ``Optimizer.__init__`` is not called, and the param groups, state
    and defaults are the wrapped optimizer's own objects, so a scheduler on either one moves
    both. Subclasses implement ``synchronize()`` (make ``.grad`` of every parameter the
    global one, or exchange parameters) and may override ``step()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                "build the optimizer on model.parameters() first, then distribute both"
            )
        inner = [optimizer, *getattr(optimizer, "optimizers", ())]  # (a MultiOptimizer's)
        if any(isinstance(opt, DistributedOptimizer) for opt in inner):
            raise TypeError(
                "this optimizer is distributed already; pass concord.distribute the plain "
                "torch optimizer (distribute it once)"
            )
        self.optimizer = optimizer

    # -- the torch.optim surface -------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(group)

    def _no_hooks(self, *args: Any, **kwargs: Any) -> Any:
        """torch.optim's hook registration (step, state_dict, load_state_dict): refused, as
        ``step()`` and the state calls here run none of them."""
        raise UsageError(
            f"{type(self).__name__} runs no torch.optim hooks (its step() is concord's, not "
            "torch's); run that code before or after opt.step() or opt.state_dict() instead"
        )

    register_step_pre_hook = register_step_post_hook = _no_hooks
    register_state_dict_pre_hook = register_state_dict_post_hook = _no_hooks
    register_load_state_dict_pre_hook = register_load_state_dict_post_hook = _no_hooks

    def synchronize(self) -> None:
        """Make this worker's gradients (or parameters) agree with the others'."""

    def step(self, closure: Any = None) -> Any:
        """Synchronize, then apply the wrapped optimizer's update."""
        if closure is not None:
            raise ValueError("concord optimizers do not take a closure; call backward() first")
        self.synchronize()
        return self.optimizer.step()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"
