"""``MultiOptimizer``: several torch optimizers over disjoint parameters, stepped as one.

The usual recipe for a model with a sparse embedding table is two optimizers: ``SparseAdam``
for the table, ``Adam`` for the rest. ``concord.distribute(model, [table_opt, dense_opt],
strategy)`` wraps them in one ``MultiOptimizer`` so every strategy sees one optimizer: AllReduce
averages the gradients and steps both; a parameter server runs each on its servers (or, with
``push="delta"``, on the workers). It is a ``torch.optim.Optimizer`` whose ``param_groups`` are
its optimizers' own group dicts in order (so an LR scheduler on either, or on the whole, still
works) and whose ``state`` is a view of theirs (each keeps its own, so each still saves its
own ``state_dict()``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch


class MultiOptimizer(torch.optim.Optimizer):
    """Torch optimizers over disjoint parameters as one.

    ``step()`` and ``zero_grad()`` do each; ``state_dict()`` is torch's format over all the
    groups in order (parameters numbered across them, as one optimizer numbers its groups'),
    which ``load_state_dict`` splits back into each optimizer's.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        flat: list[torch.optim.Optimizer] = []
        for opt in optimizers:
            if isinstance(opt, MultiOptimizer):
                flat.extend(opt.optimizers)
            elif isinstance(opt, torch.optim.Optimizer):
                flat.append(opt)
            else:
                raise TypeError(f"expected torch.optim optimizers, got {type(opt).__name__}")
        if not flat:
            raise ValueError("MultiOptimizer needs at least one optimizer")
        owner: dict[int, int] = {}
        for index, opt in enumerate(flat):
            for group in opt.param_groups:
                for p in group["params"]:
                    if owner.setdefault(id(p), index) != index:
                        raise ValueError(
                            f"a parameter of shape {list(p.shape)} is in optimizers "
                            f"{owner[id(p)]} ({type(flat[owner[id(p)]]).__name__}) and {index} "
                            f"({type(opt).__name__}); give each parameter one optimizer"
                        )
        params = [p for opt in flat for g in opt.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.optimizers = flat
        self._states = _States(flat)
        self._link()

    @property  # type: ignore[override]
    def state(self) -> MutableMapping[torch.Tensor, Any]:
        """Every optimizer's state, by parameter (reads and writes go to its optimizer's)."""
        return getattr(self, "_states", {})

    @state.setter
    def state(self, value: Any) -> None:  # torch's __init__ sets it; each keeps its own
        pass

    def _link(self) -> None:
        """List every optimizer's param groups (again after a load replaced them)."""
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    def group_owners(self) -> list[torch.optim.Optimizer]:
        """The optimizer that steps each of ``param_groups``, in order."""
        return [opt for opt in self.optimizers for _ in opt.param_groups]

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Step every optimizer (``closure``, if given, is evaluated once, before them)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "optimizers"):  # torch's __init__ adds the first group
            super().add_param_group(param_group)
            return
        raise TypeError(
            "add the group to one of the optimizers (multi.optimizers[i].add_param_group) "
            "before building the MultiOptimizer"
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of a MultiOptimizer with the same optimizers and groups;
        each optimizer checks its share as torch does. A bad one changes nothing."""
        groups, state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(groups)} param groups, this MultiOptimizer "
                f"{len(self.param_groups)}"
            )
        shares, first, claimed = [], 0, set()
        for opt in self.optimizers:
            mine = groups[first : first + len(opt.param_groups)]
            first += len(opt.param_groups)
            number = {old: new for new, old in enumerate(i for g in mine for i in g["params"])}
            claimed.update(number)
            shares.append(
                {
                    "state": {number[k]: v for k, v in state.items() if k in number},
                    "param_groups": [
                        {**g, "params": [number[i] for i in g["params"]]} for g in mine
                    ],
                }
            )
        stray = sorted(set(state) - claimed)
        if stray:
            raise ValueError(f"the state dict has state for parameters {stray[:5]} in no group")
        before = [opt.state_dict() for opt in self.optimizers]
        try:
            for opt, share in zip(self.optimizers, shares):
                opt.load_state_dict(share)
        except Exception:
            for opt, saved in zip(self.optimizers, before):
                opt.load_state_dict(saved)
            raise
        finally:
            self._link()

    def __repr__(self) -> str:
        return f"MultiOptimizer({', '.join(repr(opt) for opt in self.optimizers)})"


class _States(MutableMapping):
    """A MultiOptimizer's state: each parameter's entry in its own optimizer's state."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self._optimizers = optimizers
        self._owners = {
            id(p): opt for opt in optimizers for g in opt.param_groups for p in g["params"]
        }

    def _owner(self, param: Any) -> torch.optim.Optimizer:
        owner = self._owners.get(id(param))
        if owner is None:
            raise KeyError(param)
        return owner

    def __getitem__(self, param: Any) -> Any:
        return self._owner(param).state[param]

    def __setitem__(self, param: Any, value: Any) -> None:
        self._owner(param).state[param] = value

    def __delitem__(self, param: Any) -> None:
        del self._owner(param).state[param]

    def __iter__(self) -> Iterator[Any]:
        return itertools.chain.from_iterable(list(o.state) for o in self._optimizers)

    def __len__(self) -> int:
        return sum(len(o.state) for o in self._optimizers)


def group_owners(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizer that steps each of ``optimizer``'s param groups: itself, or for a
    :class:`MultiOptimizer` the one of its optimizers that holds the group."""
    if isinstance(optimizer, MultiOptimizer):
        return optimizer.group_owners()
    return [optimizer] * len(optimizer.param_groups)


def as_optimizer(optimizer: Any) -> Any:
    """``optimizer``, or for a list or tuple of them one :class:`MultiOptimizer`."""
    if isinstance(optimizer, list | tuple):
        return MultiOptimizer(*optimizer)
    return optimizer
