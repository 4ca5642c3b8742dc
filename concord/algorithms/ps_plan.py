"""Parameter-server planning, pure: split parameters into shards, describe the optimizer.

- :func:`plan_shards` cuts the parameters (in order, as one byte stream) into S contiguous
  shards of nearly equal bytes; a cut inside a small tensor moves to its nearest edge, a cut
  inside a large one (>= ``split_bytes`` or >= a quarter of a fair share) splits it at an
  element boundary (a sparse table stepped by rows: at a row boundary, so that each server's
  piece is whole rows), so every shard is within a quarter of its fair share of bytes. Pieces
  larger than ``piece_bytes`` are cut further (each piece is one tensor on its server, with its
  own optimizer state). Every worker computes the same plan from the same parameter list.
- :func:`pack_pieces` groups a shard's pieces for the wire: runs of consecutive pieces of one
  dtype, each run at most ``piece_bytes``, travel as one flat tensor (a *pack*), so a push or
  a reply is one frame per pack instead of one per piece (as DDP and Horovod fuse gradients
  into buckets; a pack is DESIGN.md's *bucket* on the PS wire, named apart from AllReduce's
  :class:`~concord.algorithms.buckets.Bucket`). A piece of a sparse-gradient table travels in
  a pack of its own, so a push can carry its touched rows alone. Workers and servers derive
  the same packs from the same pieces.
- :class:`OptimizerSpec` describes a torch optimizer declaratively (per param group: a class
  name from an allow-list plus JSON hyperparameters), so servers rebuild it without
  unpickling anything. Only element-wise optimizers are allowed, which is why a tensor split
  across servers updates exactly as it would whole; a :class:`MultiOptimizer`'s groups name
  their own optimizers' classes, and a server builds one torch optimizer per class over its
  groups of that class.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from concord.algorithms.multi_optimizer import MultiOptimizer, group_owners

DEFAULT_SPLIT_BYTES = 1 << 20
#: the largest piece (= concord.comm.parts.PART_BYTES, so a piece fits in one wire part and a
#: shard's push streams as several parts that are authenticated while others are in flight)
DEFAULT_PIECE_BYTES = 4 << 20

#: optimizers a server may build (all element-wise)
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "SGD": torch.optim.SGD,
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
    "RMSprop": torch.optim.RMSprop,
    "Adagrad": torch.optim.Adagrad,
    "SparseAdam": torch.optim.SparseAdam,
}
#: optimizers that take sparse gradients only (a sparse table's rows)
SPARSE_ONLY = frozenset({"SparseAdam"})
_IMPLEMENTATION_KEYS = {"self", "params", "foreach", "fused", "capturable", "differentiable"}
#: optimizers with a fused CPU kernel (one pass per step, the same arithmetic to float
#: rounding); torch's default on the CPU is a loop of tensor ops, 2-20x slower per step here
FUSED = frozenset({"SGD", "Adam", "AdamW", "Adagrad"})


@dataclass(frozen=True)
class ParamInfo:
    """A parameter as the servers see it: name, shape, dtype name, element size, group."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    itemsize: int
    group: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of the flattened parameter ``name``, held by ``server``."""

    name: str
    start: int
    stop: int
    server: int

    @property
    def key(self) -> str:
        """The wire key of this piece."""
        return f"{self.name}[{self.start}:{self.stop}]"

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Pack:
    """Consecutive pieces of one dtype sent as one flat tensor: ``members`` are the pieces'
    ``(key, offset, numel)`` in the pack, ``numel`` their total."""

    key: str
    dtype: str
    members: tuple[tuple[str, int, int], ...]

    @property
    def numel(self) -> int:
        return sum(n for _, _, n in self.members)

    @property
    def sizes(self) -> list[int]:
        return [n for _, _, n in self.members]

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each member's part of ``flat`` (this pack's values, in order) as a view; a
        one-member pack is ``flat`` itself (``Tensor.split`` costs ~10 us a call)."""
        return flat.split(self.sizes) if len(self.members) > 1 else (flat,)


def pack_pieces(
    pieces: Sequence[tuple[str, str, int, int]],
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    alone: frozenset[str] = frozenset(),
) -> tuple[Pack, ...]:
    """Group ``pieces`` (``(key, dtype name, itemsize, numel)`` in shard order) into packs:
    a new pack starts at a dtype change or where the current one would pass ``piece_bytes``;
    a piece whose key is in ``alone`` gets a pack of its own."""
    packs: list[Pack] = []
    members: list[tuple[str, int, int]] = []
    dtype, used, single = "", 0, False
    for key, kind, itemsize, numel in pieces:
        full = kind != dtype or (used + numel) * itemsize > piece_bytes
        if members and (full or single or key in alone):
            packs.append(Pack(f"pack{len(packs)}", dtype, tuple(members)))
            members, used = [], 0
        members.append((key, used, numel))
        dtype, used, single = kind, used + numel, key in alone
    if members:
        packs.append(Pack(f"pack{len(packs)}", dtype, tuple(members)))
    return tuple(packs)


@dataclass(frozen=True)
class ShardPlan:
    """Which pieces each server holds (``shards[s]``), in parameter order."""

    shards: tuple[tuple[Piece, ...], ...]

    def nbytes(self, params: Sequence[ParamInfo]) -> list[int]:
        """Bytes held by each server."""
        size = {p.name: p.itemsize for p in params}
        return [sum(pc.numel * size[pc.name] for pc in shard) for shard in self.shards]


def plan_shards(
    params: Sequence[ParamInfo],
    servers: int,
    split_bytes: int = DEFAULT_SPLIT_BYTES,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    whole: frozenset[str] = frozenset(),
) -> ShardPlan:
    """Cut ``params`` into ``servers`` shards balanced by bytes (see the module docstring);
    the parameters named in ``whole`` are not cut into ``piece_bytes`` pieces (one piece per
    server: a sparse table whose pushes and replies are rows, which then cost per piece), and
    are split between servers at row boundaries (where a row is under ``split_at``)."""
    if servers < 1 or piece_bytes < 1:
        raise ValueError(f"need servers >= 1 and piece_bytes >= 1, got {servers}, {piece_bytes}")
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise ValueError(f"parameter names must be unique, got {names}")
    starts = [0]
    for p in params:
        starts.append(starts[-1] + p.nbytes)
    total = starts[-1]
    # a cut snaps by < 1/8 of a fair share, so each shard (two cuts) is within 1/4 of it
    split_at = min(split_bytes, total / servers / 4)
    cuts = [0]
    for k in range(1, servers):
        cuts.append(max(cuts[-1], _cut(params, starts, total * k / servers, split_at, whole)))
    cuts.append(total)
    shards: list[list[Piece]] = [[] for _ in range(servers)]
    for p, begin in zip(params, starts):
        if p.nbytes == 0:  # an empty tensor still needs a home: server 0
            shards[0].append(Piece(p.name, 0, 0, 0))
        for s in range(servers):
            lo, hi = max(begin, cuts[s]), min(begin + p.nbytes, cuts[s + 1])
            if hi > lo:
                start, stop = (lo - begin) // p.itemsize, (hi - begin) // p.itemsize
                step = stop - start if p.name in whole else max(1, piece_bytes // p.itemsize)
                shards[s].extend(
                    Piece(p.name, i, min(i + step, stop), s) for i in range(start, stop, step)
                )
    return ShardPlan(tuple(tuple(s) for s in shards))


def _cut(
    params: Sequence[ParamInfo],
    starts: list[int],
    target: float,
    split_at: float,
    by_row: frozenset[str],
) -> int:
    """The byte offset of one cut near ``target``, on an element (or tensor) boundary; on a
    row boundary in the parameters ``by_row`` whose rows are under ``split_at`` bytes (the
    cut then moves by less than half of that, as a small tensor's does)."""
    for p, begin in zip(params, starts):
        end = begin + p.nbytes
        if begin <= target < end:
            if p.nbytes >= split_at:
                row = p.itemsize * math.prod(p.shape[1:])
                unit = row if p.name in by_row and row < split_at else p.itemsize
                return begin + round((target - begin) / unit) * unit
            return begin if target - begin < end - target else end
    return starts[-1]


# -- optimizer spec -------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerSpec:
    """Each param group's optimizer class name (from :data:`OPTIMIZERS`) and settings."""

    names: tuple[str, ...]
    groups: tuple[dict[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        return {"names": list(self.names), "groups": [dict(g) for g in self.groups]}

    @classmethod
    def from_json(cls, data: Any) -> OptimizerSpec:
        """Validate an untrusted description (allow-listed classes, keys and value types)."""
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("groups"), list)
            or not isinstance(data.get("names"), list)
            or len(data["names"]) != len(data["groups"])
        ):
            raise ValueError(f"bad optimizer spec {str(data)[:200]}")
        groups = []
        for i, (name, group) in enumerate(zip(data["names"], data["groups"])):
            allowed = _allowed_keys(name)
            if not isinstance(group, dict):
                raise ValueError(f"optimizer param group {i} is not a map: {group!r}")
            for key, value in group.items():
                if key not in allowed:
                    raise ValueError(f"{name} has no setting {key!r}; allowed: {sorted(allowed)}")
                _check_value(key, value)
            groups.append(dict(group))
        return cls(tuple(data["names"]), tuple(groups))

    def build(
        self, params_by_group: Sequence[Sequence[torch.Tensor]], fused: Collection[int] = ()
    ) -> BuiltOptimizer:
        """Fresh optimizers over ``params_by_group[i]`` with group ``i``'s class and settings:
        one per class (a :class:`MultiOptimizer` of them when there are several); the groups
        ``fused`` step with torch's fused kernel where the class has one (see :data:`FUSED`;
        it takes no sparse gradients).

        Groups with no tensors here are left out (a shard may hold none of a group).
        """
        if len(params_by_group) != len(self.groups):
            raise ValueError(f"{len(params_by_group)} groups given, spec has {len(self.groups)}")
        by_class: dict[str, list[int]] = {}
        for i, ps in enumerate(params_by_group):
            if len(ps):
                by_class.setdefault(self.names[i], []).append(i)
        if not by_class:
            raise ValueError("no parameters to optimize on this shard")
        optimizers, groups = [], {}
        for name, indices in by_class.items():
            kernel = name in FUSED
            optimizer = OPTIMIZERS[name](
                [
                    {"params": list(params_by_group[i]), **plain_settings(self.groups[i])}
                    | ({"fused": i in fused} if kernel else {})
                    for i in indices
                ]
            )
            optimizers.append(optimizer)
            groups.update(zip(indices, optimizer.param_groups))
        whole = optimizers[0] if len(optimizers) == 1 else MultiOptimizer(*optimizers)
        return BuiltOptimizer(whole, groups)


@dataclass(frozen=True)
class BuiltOptimizer:
    """What :meth:`OptimizerSpec.build` makes: the optimizer to step, and each group index
    of the spec that has tensors here -> its param group dict in that optimizer."""

    optimizer: torch.optim.Optimizer
    groups: dict[int, dict[str, Any]]


def spec_from_optimizer(optimizer: torch.optim.Optimizer) -> OptimizerSpec:
    """Describe ``optimizer`` (its exact class, or each of a MultiOptimizer's, must be in
    :data:`OPTIMIZERS`)."""
    names, groups = [], []
    for owner, group in zip(group_owners(optimizer), optimizer.param_groups):
        name = type(owner).__name__
        if OPTIMIZERS.get(name) is not type(owner):
            raise TypeError(
                f"a parameter server runs the optimizer on the servers, so it must be one of "
                f"torch.optim.{', torch.optim.'.join(OPTIMIZERS)}; got "
                f"{type(owner).__qualname__}. Use one of those, push='delta' (your optimizer "
                "then steps on the workers), or the AllReduce strategy"
            )
        settings = {}
        for key in sorted(_allowed_keys(name) & set(group)):
            value = group[key]
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, tuple):
                value = list(value)
            _check_value(key, value)
            settings[key] = value
        names.append(name)
        groups.append(settings)
    return OptimizerSpec(tuple(names), tuple(groups))


def group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    """The class name of the optimizer that steps each of ``optimizer``'s param groups."""
    return [type(owner).__name__ for owner in group_owners(optimizer)]


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's allow-listed settings now (to follow a worker's LR schedule)."""
    return [dict(g) for g in spec_from_optimizer(optimizer).groups]


@functools.cache
def _allowed_keys(name: Any) -> frozenset[str]:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not allowed; choose one of {list(OPTIMIZERS)}")
    sig = inspect.signature(OPTIMIZERS[name].__init__)
    return frozenset(sig.parameters) - _IMPLEMENTATION_KEYS


def _check_value(key: str, value: Any) -> None:
    scalar = (bool, int, float, type(None))
    if isinstance(value, scalar):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"optimizer setting {key}={value} is not finite")
        return
    if isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        return
    raise TypeError(
        f"optimizer setting {key}={value!r} must be a number, bool, None or list of numbers"
    )


def plain_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as torch wants them (JSON lists back to tuples, e.g. Adam's betas)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
