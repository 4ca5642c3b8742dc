"""Optimizer state of a parameter-server job, pure: the servers' pieces <-> torch's format.

A server's optimizer keeps state per piece (:class:`~concord.algorithms.ps_plan.Piece`):
tensors as long as the piece (SGD's ``momentum_buffer``, Adam's ``exp_avg``, ...) and 0-d ones
(``step``). :func:`merge_pieces` assembles a parameter's pieces from every server into the
state one torch optimizer over the whole parameter holds, so a PS job's ``state_dict()`` is
exactly what a single-process optimizer would save (a checkpoint loads into either);
:func:`piece_state` cuts a parameter's state into one piece's share.

:func:`state_layout` says what a state must look like for an optimizer class and its settings
(each name, one value per parameter or one per element), found by stepping a one-element
optimizer with those settings; :func:`check_state` holds a checkpoint to it on workers and
servers alike. On the wire a shard's state is ``meta["state"] = [[piece index, name], ...]``
with the tensors under ``state0``, ``state1``, ... (:func:`encode_state`, :func:`decode_state`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from concord.algorithms.ps_plan import (
    OPTIMIZERS,
    SPARSE_ONLY,
    ParamInfo,
    Piece,
    group_names,
    hyperparameters,
    plain_settings,
)

#: state name -> 0 (one value per parameter, e.g. ``step``), 1 (one per element) or
#: :data:`COUNT` (a Python int per parameter: SparseAdam's ``step``)
StateLayout = dict[str, int]
COUNT = 2
PieceStates = dict[int, dict[str, Any]]  # piece index -> its state


@dataclass(frozen=True)
class ParamSettings:
    """A parameter's optimizer class name and allow-listed group settings: what its state
    layout and fresh state depend on."""

    name: str
    settings: dict[str, Any]

    def layout(self) -> StateLayout:
        return state_layout(self.name, self.settings)


def state_layout(name: str, settings: Mapping[str, Any]) -> StateLayout:
    """The state a ``name`` optimizer with ``settings`` keeps per parameter after a step."""
    return dict(_layout(name, json.dumps(dict(settings), sort_keys=True)))


def settings_by_param(optimizer: torch.optim.Optimizer) -> dict[int, ParamSettings]:
    """Each parameter's (by ``id``) :class:`ParamSettings`."""
    groups = zip(optimizer.param_groups, group_names(optimizer), hyperparameters(optimizer))
    return {id(p): ParamSettings(name, hp) for group, name, hp in groups for p in group["params"]}


@functools.lru_cache(maxsize=64)
def _layout(name: str, settings: str) -> tuple[tuple[str, int], ...]:
    probe = torch.zeros(1, requires_grad=True)
    optimizer = OPTIMIZERS[name]([probe], **plain_settings(json.loads(settings)))
    grad = torch.zeros(1)
    probe.grad = grad.to_sparse() if name in SPARSE_ONLY else grad
    optimizer.step()
    return tuple(sorted((k, _kind(v)) for k, v in optimizer.state[probe].items()))


def _kind(value: Any) -> int:
    if torch.is_tensor(value):
        return min(value.dim(), 1)
    if type(value) is int:
        return COUNT
    raise TypeError(f"optimizer state of type {type(value).__name__} is not supported")


def stored(value: Any, kind: int, like: torch.Tensor) -> Any:
    """A checked state value as an optimizer of the tensor ``like`` keeps it: a copy of its
    dtype and shape (per element), a 0-d float32 copy (per parameter) or a Python int
    (:data:`COUNT`; on the wire a 0-d tensor)."""
    if kind == COUNT:
        return int(value)
    if kind:
        return value.to(like.dtype).reshape(like.shape).clone()
    return value.to(torch.float32).reshape(()).clone()


def wire_value(value: Any) -> torch.Tensor:
    """A state value as a message carries it (a :data:`COUNT` as a 0-d int64 tensor)."""
    if torch.is_tensor(value):
        return value
    if type(value) is not int:
        raise TypeError(f"optimizer state of type {type(value).__name__} is not supported")
    return torch.tensor(value, dtype=torch.int64)


def fresh_state(name: str, settings: Mapping[str, Any], like: torch.Tensor) -> dict:
    """What a newly built optimizer holds for a tensor like ``like`` (empty for most; Adagrad
    starts its ``sum`` and ``step`` at construction)."""
    probe = torch.zeros_like(like, requires_grad=True)
    optimizer = OPTIMIZERS[name]([probe], **plain_settings(dict(settings)))
    return dict(optimizer.state.get(probe, {}))


def check_state(where: str, state: Mapping[str, Any], layout: StateLayout, numel: int) -> None:
    """Raise ValueError unless ``state`` (one parameter's or piece's) is empty (never stepped)
    or has exactly the names of ``layout``, each a floating-point tensor of the right size (a
    :data:`COUNT`: a non-negative int, or a 0-d integer tensor as the wire carries it)."""
    if not state:
        return
    if set(state) != set(layout):
        raise ValueError(
            f"{where}: optimizer state has {sorted(state)} but this optimizer keeps "
            f"{sorted(layout)} (a checkpoint of another optimizer or other settings?)"
        )
    for key, value in state.items():
        if layout[key] == COUNT:
            count = value.item() if torch.is_tensor(value) and value.dim() == 0 else value
            if type(count) is not int or count < 0:
                raise ValueError(f"{where}: optimizer state {key!r} must be a count (an int)")
            continue
        if not torch.is_tensor(value) or not value.is_floating_point():
            raise ValueError(f"{where}: optimizer state {key!r} must be a floating-point tensor")
        want = numel if layout[key] else 1
        if value.numel() != want:
            raise ValueError(
                f"{where}: optimizer state {key!r} has {value.numel()} elements, expected {want}"
            )


def piece_state(state: Mapping[str, Any], layout: StateLayout, piece: Piece) -> dict[str, Any]:
    """``piece``'s share of a (checked) parameter state: per-element values sliced flat, 0-d
    values and counts as they are; copies."""
    return {
        key: value
        if layout[key] == COUNT
        else value.reshape(-1)[piece.start : piece.stop].clone()
        if layout[key]
        else value.detach().reshape(()).clone()
        for key, value in state.items()
    }


def merge_pieces(
    info: ParamInfo,
    parts: Sequence[tuple[Piece, Mapping[str, torch.Tensor]]],
    layout: StateLayout | None = None,
) -> dict[str, Any]:
    """A whole parameter's state from its pieces' states (as servers send them: 1-D per-element
    tensors, 0-d per-parameter ones), with the :data:`COUNT` s of ``layout`` back to ints.
    Raises ValueError if the pieces disagree."""
    parts = sorted(parts, key=lambda part: part[0].start)
    covered = [(pc.start, pc.stop) for pc, _ in parts]
    if (
        not parts
        or covered[0][0] != 0
        or covered[-1][1] != info.numel
        or any(a[1] != b[0] for a, b in zip(covered, covered[1:]))
    ):
        raise ValueError(f"{info.name}: pieces {covered} do not cover its {info.numel} elements")
    names = {frozenset(state) for _, state in parts}
    if len(names) != 1:
        raise ValueError(f"{info.name}: its pieces hold different state names {sorted(names)}")
    out = {}
    for key in sorted(next(iter(names))):
        values = [state[key] for _, state in parts]
        if values[0].dim() == 0:
            if any(not torch.equal(v, values[0]) for v in values[1:]):
                raise ValueError(f"{info.name}: its pieces disagree on {key!r}")
            count = layout is not None and layout.get(key) == COUNT
            out[key] = int(values[0].item()) if count else values[0].clone()
            continue
        if [v.numel() for v in values] != [pc.numel for pc, _ in parts]:
            raise ValueError(f"{info.name}: state {key!r} does not match its pieces' sizes")
        out[key] = torch.cat([v.reshape(-1) for v in values]).reshape(info.shape)
    return out


def encode_state(states: PieceStates) -> tuple[list[list[Any]], dict[str, torch.Tensor]]:
    """``(meta["state"], tensors)`` for a message carrying ``states``."""
    entries, tensors = [], {}
    for index in sorted(states):
        for key, value in states[index].items():
            entries.append([index, key])
            tensors[f"state{len(tensors)}"] = wire_value(value)
    return entries, tensors


def decode_state(entries: Any, tensors: Mapping[str, torch.Tensor], pieces: int) -> PieceStates:
    """The states a message carries (``meta["state"]`` and its ``state<i>`` tensors), checked:
    piece indices below ``pieces``, string names, no duplicates, every tensor listed."""
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise ValueError(f"meta 'state' must be a list, got {type(entries).__name__}")
    wanted = {f"state{i}" for i in range(len(entries))}
    got = {key for key in tensors if key.startswith("state")}
    if got != wanted:
        raise ValueError(f"state tensors {sorted(got)[:5]} do not match the {len(entries)} entries")
    states: PieceStates = {}
    for i, entry in enumerate(entries):
        ok = isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int
        if not ok or not 0 <= entry[0] < pieces or not isinstance(entry[1], str):
            raise ValueError(f"bad state entry {str(entry)[:100]}")
        state = states.setdefault(entry[0], {})
        if entry[1] in state:
            raise ValueError(f"state {entry[1]!r} of piece {entry[0]} is listed twice")
        state[entry[1]] = tensors[f"state{i}"]
    return states
