"""The worker side of a parameter server: register, then push and pull every step.

``connect`` plans the shards (the same plan on every worker), looks up each server's address
in the job's store, registers (worker 0 sends the initial parameters and the optimizer spec;
every worker gets the servers' parameters back) and returns a :class:`PSOptimizer`.

``PSOptimizer.step()`` sends one message per server, all before waiting for any reply, so the
shards work in parallel:

- push="grad": the gradients, packed (:func:`concord.algorithms.ps_plan.pack_pieces`: one
  flat tensor per run of pieces, zeros for a parameter without ``.grad``, which
  ``meta["absent"]`` names; a piece of a sparse-gradient table travels in a pack of its own,
  as the rows the gradient touched); the reply carries the shard's new parameters, packed the
  same way (when the table's optimizer changes only the touched rows, its pack carries the
  rows that changed: those the sync round touched, or in async mode those changed since the
  version this worker last loaded, which its push names), copied into the model. The local
  optimizer never steps.
- push="delta": the local optimizer steps, the change since the last pull is pushed (packed),
  and the server's latest parameters replace the local ones. A sparse table whose local
  optimizer moves only the rows with a gradient (plain SGD, Adagrad, SparseAdam) pushes the
  change of the rows its gradients touched since the last push, and gets back the rows
  changed since the version it last loaded.

Packing is the one copy of the gradients: straight into the server's shared-memory lane on
the same host, else into a buffer reused every step; a pack of one piece (a large tensor)
that does not go into the lane is sent as the gradient itself. zmq reads these buffers; it
is done before the reply comes back, so ``zero_grad()`` after ``step()`` is safe. With
``compression`` that copy casts float gradients (and a table's row values) to half precision.
"""

from __future__ import annotations

import logging
import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from concord.algorithms.ps_plan import (
    SPARSE_ONLY,
    OptimizerSpec,
    Pack,
    ParamInfo,
    Piece,
    group_names,
    hyperparameters,
    pack_pieces,
    plan_shards,
    spec_from_optimizer,
)
from concord.algorithms.ps_state import (
    PieceStates,
    check_state,
    decode_state,
    encode_state,
    merge_pieces,
    piece_state,
    settings_by_param,
)
from concord.algorithms.row_grads import (
    ROWS_SUFFIX,
    check_rows,
    gather_rows,
    row_range,
    row_width,
    scatter_rows,
    untouched_rows_stay,
)
from concord.comm.alloc import keep_freed_memory
from concord.comm.channel import ClientChannel, lanes_wanted
from concord.comm.discovery import wait_for_address
from concord.comm.wire import Codec, Message, dtype_name
from concord.errors import ProtocolError, UsageError
from concord.strategies.allreduce import broadcast_state
from concord.strategies.base import DistributedOptimizer
from concord.strategies.ps.config import ParameterServer, pushed_dtype
from concord.strategies.ps.shard import piece_meta
from concord.strategies.sparse import dense_grad, piece_rows, sparse_grad_params

log = logging.getLogger("concord.ps")


def describe(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[list[nn.Parameter], list[ParamInfo]]:
    """The optimizer's parameters in order, with their model names, shapes, dtypes, groups."""
    names = {id(p): name for name, p in model.named_parameters()}
    params, infos = [], []
    for group_index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            name = names.get(id(param))
            if name is None:
                raise UsageError(
                    f"optimizer parameter #{len(params)} of shape {list(param.shape)} is not a "
                    "parameter of the model; build the optimizer on model.parameters()"
                )
            if not param.is_contiguous():
                raise UsageError(f"parameter {name!r} is not contiguous; make it contiguous")
            params.append(param)
            infos.append(
                ParamInfo(
                    name,
                    tuple(param.shape),
                    dtype_name(param.dtype),
                    param.element_size(),
                    group_index,
                )
            )
    return params, infos


def connect(
    strategy: ParameterServer,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: Any,
    servers: int,
) -> PSOptimizer:
    """Register ``model``'s parameters with the servers and return the wrapped optimizer."""
    broadcast_state(model)  # buffers and parameters outside the optimizer start equal
    keep_freed_memory()  # reuse message buffers instead of page-faulting fresh ones
    params, infos = describe(model, optimizer)
    sparse = sparse_grad_params(model)
    spec = None
    if strategy.push == "grad":
        spec = spec_from_optimizer(optimizer)
        _check_sparse_only(spec, params, infos, sparse)
        spec = spec.to_json()
    tables = _row_tables(optimizer, params, infos, sparse)
    plan = plan_shards(infos, servers, whole=tables)
    codec = Codec(ctx.secret)
    hint = f"did the job start with concord run --servers {servers}, and did it start?"
    channels = []
    for s in range(servers):
        key = f"{ctx.store_prefix}server/{s}/addr"
        address = wait_for_address(ctx.store, key, f"server {s}", ctx.timeout, hint)
        chan = ClientChannel(codec, address, f"server {s}", ctx.timeout)
        if lanes_wanted():  # same host: bulk bytes via /dev/shm
            chan.open_lanes()
        channels.append(chan)
    cls = PSOptimizer
    if strategy.overlap:  # pushes from autograd hooks, pulls in the background
        from concord.strategies.ps.overlap import OverlapPSOptimizer as cls
    opt = cls(optimizer, strategy, ctx, params, infos, plan.shards, channels, sparse)
    opt.register(spec)
    opt.attach(model)
    return opt


class PSOptimizer(DistributedOptimizer):
    """The user's optimizer wrapped for a parameter server; ``step()`` pushes and pulls."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        strategy: ParameterServer,
        ctx: Any,
        params: list[nn.Parameter],
        infos: list[ParamInfo],
        shards: tuple[tuple[Piece, ...], ...],
        channels: list[ClientChannel],
        sparse: set[int] | None = None,
    ) -> None:
        super().__init__(optimizer)
        self.sparse = sparse or set()  # id()s of the parameters whose gradient is sparse
        self.strategy, self.rank, self.world = strategy, ctx.rank, ctx.world_size
        self.timeout = ctx.timeout
        self._params, self._infos = params, infos
        by_name = dict(zip((i.name for i in infos), zip(params, infos)))
        self._slots = [[(pc, *by_name[pc.name]) for pc in shard] for shard in shards]
        self._packs = [_packs(slots, self.sparse) for slots in self._slots]
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}  # reused push packs
        self._push_views = True  # a one-piece pack may be the gradient itself (see _pack)
        self.channels = channels
        self.versions = [0] * len(channels)
        self.steps = 0  # pushes made; a sync push is labelled with it (see step())
        self._base: dict[tuple[int, str], torch.Tensor] = {}  # (server, pack) -> last pulled
        self._groups = {id(p): info.group for p, info in zip(params, infos)}
        # push="delta": a sparse table's rows touched since the last push (None: all of them)
        self._touched: dict[int, list[torch.Tensor] | None] = {}
        self._hp_sent: list[dict[str, Any]] | None = None
        self._finalizer = weakref.finalize(self, _goodbye, channels, ctx.rank)

    # -- protocol ---------------------------------------------------------------------------
    def register(self, spec: dict[str, Any] | None) -> None:
        """Register with every server and load their parameters."""
        config = self.strategy.config(self.world)
        for s, chan in enumerate(self.channels):
            metas = [
                piece_meta(pc, info.shape, info.dtype, info.group, id(p) in self.sparse)
                for pc, p, info in self._slots[s]
            ]
            tensors = {pc.key: _flat(p)[pc.start : pc.stop].cpu() for pc, p, _ in self._slots[s]}
            meta = {"config": config, "params": metas, "optimizer": spec}
            chan.send(
                Message(
                    "register",
                    worker=self.rank,
                    meta=meta,
                    tensors=tensors if self.rank == 0 else {},
                )
            )
        self._collect("registration (worker 0 registers first)", 2 * self.timeout + 5)

    def step(self, closure: Any = None) -> None:
        """Push this worker's gradients (or parameter change) and load the new parameters."""
        if closure is not None:
            raise ValueError("concord optimizers do not take a closure; call backward() first")
        self._check_open()
        delta = self.strategy.push == "delta"
        if delta:
            self._note_touched()
            self.optimizer.step()
        meta = {} if delta else self._hp_meta() | self._loss_scaling()
        for s, chan in enumerate(self.channels):
            if delta:
                chan.send(self._push_message(s, meta, self._deltas(s)))
            else:
                chan.send(self._push_message(s, meta, *self._grads(s)))
        self._touched.clear()
        self._collect("new parameters after a push", 2 * self.timeout + 5)
        self.steps += 1

    def attach(self, model: nn.Module) -> None:
        """Hook into ``model`` (nothing to do here; the overlapping optimizer hooks)."""

    def _push_message(
        self, s: int, meta: dict[str, Any], tensors: dict, absent: list[int] | None = None
    ) -> Message:
        # sync: round t takes every worker's t-th push, so all workers make the same
        # number of steps (an epoch) and a late push is dropped, never waited for;
        # async: the version the gradient was computed on (its staleness)
        label = self.steps if self.strategy.mode == "sync" else self.versions[s]
        meta = {**meta, "absent": absent} if absent else meta
        return Message("push", worker=self.rank, step=label, meta=meta, tensors=tensors)

    def synchronize(self) -> None:
        """Load the servers' latest parameters."""
        self._check_open()
        for chan in self.channels:
            chan.send(Message("pull", worker=self.rank))
        self._collect("parameters (pull)", 2 * self.timeout + 5)

    def server_stats(self) -> list[dict[str, Any]]:
        """Each server's stats: version, staleness/lead histograms, bytes, dropped gradients."""
        return [
            m.meta for m in self._requests(lambda s: Message("stats", worker=self.rank), "stats")
        ]

    @property
    def state(self) -> Any:
        """push="grad": the servers' optimizer state by parameter, as ``torch.optim`` keys it
        (a snapshot fetched on each access: changing it changes nothing on the servers)."""
        if self.strategy.push == "delta":
            return self.optimizer.state
        states = self.state_dict()["state"]
        return defaultdict(dict, {self._params[i]: state for i, state in states.items()})

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state as one torch optimizer over the whole model would save it (a
        checkpoint loads into either): push="grad" gathers it from the servers' optimizers,
        push="delta" is this worker's own optimizer's."""
        if self.strategy.push == "delta":
            return self.optimizer.state_dict()
        replies = self._requests(lambda s: Message("state", worker=self.rank), "optimizer state")
        parts: dict[str, list[tuple[Piece, dict[str, torch.Tensor]]]] = {}
        try:
            for s, reply in enumerate(replies):
                if reply.op != "state":
                    raise ValueError(f"server {s} answered {reply.op!r}, expected 'state'")
                states = decode_state(reply.meta.get("state"), reply.tensors, len(self._slots[s]))
                for i, (piece, _, _) in enumerate(self._slots[s]):
                    parts.setdefault(piece.name, []).append((piece, states.get(i, {})))
            settings = settings_by_param(self.optimizer)
            merged = {
                i: merge_pieces(info, parts[info.name], settings[id(param)].layout())
                for i, (param, info) in enumerate(zip(self._params, self._infos))
            }
        except ValueError as exc:
            raise ProtocolError(f"bad optimizer state from the servers: {exc}") from None
        return {
            "state": {i: state for i, state in merged.items() if state},
            "param_groups": self.optimizer.state_dict()["param_groups"],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint's optimizer state; call it on every worker before the first step.
        Its settings go into this worker's optimizer; push="grad" sends the state to the
        servers (worker 0 does), push="delta" keeps it here. Worker 0 also sends its current
        parameters, and every worker loads them back: all go on from worker 0's model."""
        self._check_open()
        before = self.optimizer.state_dict()
        self.optimizer.load_state_dict(state_dict)  # torch's own checks, and the settings
        self._hp_sent = None  # the next push repeats them
        shards: list[PieceStates] = [{} for _ in self.channels]
        if self.strategy.push == "grad":
            try:
                shards = self._split_state()
            except ValueError as exc:
                self.optimizer.load_state_dict(before)  # a bad checkpoint changes nothing
                raise UsageError(f"cannot load this optimizer state: {exc}") from None
            self.optimizer.state.clear()  # kept by the servers, not here

        def make(s: int) -> Message:
            if self.rank != 0:
                return Message("load_state", worker=self.rank)
            entries, tensors = encode_state(shards[s])
            grad = self.strategy.push == "grad"  # (delta: any optimizer, kept here)
            meta = {"state": entries, "hp": hyperparameters(self.optimizer) if grad else None}
            return Message(
                "load_state", worker=0, meta=meta, tensors={**self._param_packs(s), **tensors}
            )

        awaiting = "the parameters after loading a checkpoint (worker 0 sends them)"
        for s, reply in enumerate(self._requests(make, awaiting, 2 * self.timeout + 5)):
            self._load(s, reply)

    def _split_state(self) -> list[PieceStates]:
        """The local optimizer's (just loaded) state, checked and cut into each server's."""
        layouts = {key: hp.layout() for key, hp in settings_by_param(self.optimizer).items()}
        for param, info in zip(self._params, self._infos):
            state = self.optimizer.state.get(param, {})
            check_state(f"parameter {info.name!r}", state, layouts[id(param)], info.numel)
        shards: list[PieceStates] = []
        for slots in self._slots:
            shards.append({})
            for i, (piece, param, _) in enumerate(slots):
                state = self.optimizer.state.get(param)
                if state:
                    shards[-1][i] = piece_state(state, layouts[id(param)], piece)
        return shards

    def _requests(
        self, make: Callable[[int], Message], awaiting: str, timeout: float | None = None
    ) -> list[Message]:
        """Send ``make(s)`` to every server ``s``, then wait for each reply."""
        self._check_open()
        for s, chan in enumerate(self.channels):
            chan.send(make(s))
        return [chan.recv(f"{awaiting} (worker {self.rank})", timeout) for chan in self.channels]

    def close(self) -> None:
        """Say goodbye to the servers (also done at exit); the optimizer is unusable after."""
        self._finalizer()

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise ProtocolError(
                "this optimizer said goodbye to the servers (close()); no more steps"
            )

    # -- packs ------------------------------------------------------------------------------
    def _grads(self, s: int) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Server ``s``'s gradient packs, and the indices of its pieces without a gradient."""
        out, absent, index = {}, [], 0
        summed: dict[int, torch.Tensor] = {}  # a table's gradient coalesced once, for its pieces
        for pack, members in self._packs[s]:
            if self._push_rows(members):  # a sparse gradient's rows, alone in their pack
                ((pc, param),) = members
                if param.grad is not None and id(param) not in summed:
                    summed[id(param)] = param.grad.coalesce()
                values, rows = piece_rows(param, summed.get(id(param)), pc.start, pc.stop)
                if not self._push_views:  # step() returns before zmq reads them
                    values, rows = values.clone(), rows.clone()
                values = values.to(pushed_dtype(self.strategy.compression, values.dtype))
                out[pack.key], out[pack.key + ROWS_SUFFIX] = values, rows
                absent.extend([index] if param.grad is None else [])
                index += 1
                continue
            pieces = []
            for pc, param in members:
                grad = param.grad
                if grad is None:
                    absent.append(index)
                    pieces.append(torch.zeros(pc.numel, dtype=param.dtype, device=param.device))
                else:  # (a sparse gradient not of a sparse=True Embedding: densified)
                    pieces.append(dense_grad(grad.detach()).reshape(-1)[pc.start : pc.stop])
                index += 1
            out[pack.key] = self._pack(s, pack, pieces)
        return out, absent

    def _table_piece(self, members: list[tuple[Piece, nn.Parameter]]) -> bool:
        """Whether a pack is the one piece of a sparse table whose rows have elements (only
        such a pack can travel as rows; a zero-width table goes as its empty dense pack)."""
        return len(members) == 1 and id(members[0][1]) in self.sparse and members[0][0].numel > 0

    def _push_rows(self, members: list[tuple[Piece, nn.Parameter]]) -> bool:
        """Whether a gradient pack goes as rows (:mod:`concord.algorithms.row_grads`): a
        :meth:`_table_piece` whose gradient is sparse (or None)."""
        if not self._table_piece(members):
            return False
        grad = members[0][1].grad
        return grad is None or grad.is_sparse

    def _pack(self, s: int, pack: Pack, pieces: list[torch.Tensor]) -> torch.Tensor:
        """One flat CPU tensor of ``pieces``: built in server ``s``'s lane when it has room (no
        copy to send it), else in a buffer reused step to step."""
        dtype = pushed_dtype(self.strategy.compression, pieces[0].dtype)
        if any(p.device.type != "cpu" for p in pieces):
            return torch.cat(pieces).to(dtype).cpu()
        space = self.channels[s].lane_space(pack.numel * dtype.itemsize)
        if space is not None:  # (cast on the way in, with compression)
            return torch.cat(pieces, out=torch.frombuffer(space, dtype=dtype))
        if len(pieces) == 1 and self._push_views and pieces[0].dtype == dtype:
            return pieces[0]  # zmq (or the lane's put) copies it
        buffer = self._buffers.get((s, pack.key))
        if buffer is None or buffer.dtype != dtype:
            buffer = self._buffers[s, pack.key] = torch.empty(pack.numel, dtype=dtype)
        return torch.cat(pieces, out=buffer)

    def _param_packs(self, s: int) -> dict[str, torch.Tensor]:
        """Server ``s``'s packs of this worker's current parameter values."""
        return {pack.key: _pack_values(members) for pack, members in self._packs[s]}

    def _deltas(self, s: int) -> dict[str, torch.Tensor]:
        """Server ``s``'s packs of the change since the last pull: a sparse table's as the
        rows it touched since the last push (see :meth:`_delta_rows`), the rest whole."""
        out = {}
        for pack, members in self._packs[s]:
            base = self._base[s, pack.key]
            rows = self._delta_rows(members)
            if rows is None:
                out[pack.key] = _pack_values(members) - base
                continue
            ((pc, param),) = members
            width = row_width(param.shape)
            now = gather_rows(
                _flat(param)[pc.start : pc.stop], rows.to(param.device), width, pc.start
            )
            out[pack.key] = now.cpu() - gather_rows(base, rows, width, pc.start)
            out[pack.key + ROWS_SUFFIX] = rows
        return out

    def _note_touched(self) -> None:
        """push="delta", before the local step: the rows each sparse table's gradient touches
        (a dense gradient touches all of them)."""
        for param in self._params:
            if id(param) not in self.sparse or param.grad is None:
                continue
            touched = self._touched.setdefault(id(param), [])
            if touched is not None and param.grad.is_sparse:
                touched.append(param.grad._indices()[0].cpu())
            else:
                self._touched[id(param)] = None

    def _delta_rows(self, members: list[tuple[Piece, nn.Parameter]]) -> torch.Tensor | None:
        """The rows (sorted, unique) whose change a one-piece pack of a sparse table pushes:
        those its gradients touched since the last push, when the local optimizer moves only
        those; None: the whole pack."""
        if not self._table_piece(members):
            return None
        pc, param = members[0]
        index = self._groups[id(param)]
        group, name = self.optimizer.param_groups[index], group_names(self.optimizer)[index]
        touched = self._touched.get(id(param), [])
        if touched is None or not untouched_rows_stay(name, group):
            return None
        first, end = row_range(pc.start, pc.stop, row_width(param.shape))
        rows = torch.unique(torch.cat(touched)) if touched else torch.zeros(0, dtype=torch.long)
        return rows[(rows >= first) & (rows < end)]

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """``torch.amp.GradScaler.step(opt)`` calls a sync ``step()`` even after an overflow,
        with ``grad_scale`` and ``found_inf`` set (see ``_loss_scaling``): the round must go on
        for every worker. Async steps it skips as usual."""
        return self.strategy.mode == "sync"

    def _loss_scaling(self) -> dict[str, Any]:
        """Under ``GradScaler.step(opt)``: unscale this worker's gradients (unless
        ``scaler.unscale_(opt)`` did) and tell the servers whether they overflowed; the servers
        skip a round any worker overflowed, as one process skips that step."""
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if scale is not None:
            inv = 1.0 / float(scale)  # a power of two: exact, as GradScaler's own unscale_
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(inv)
        return {"overflow": True} if found_inf is not None and float(found_inf) > 0 else {}

    def _hp_meta(self) -> dict[str, Any]:
        settings = hyperparameters(self.optimizer)
        if settings == self._hp_sent:
            return {}
        self._hp_sent = settings
        return {"hp": settings}

    def _collect(self, awaiting: str, timeout: float) -> None:
        for s, chan in enumerate(self.channels):
            loaded: set[str] = set()
            rows: dict[str, torch.Tensor] = {}  # row numbers whose values come in a later part
            reply = chan.recv(
                awaiting=f"{awaiting} (worker {self.rank})",
                timeout=timeout,
                on_part=lambda part, s=s, loaded=loaded, rows=rows: loaded.update(
                    self._copy_in(s, part, rows)
                ),
                views=self.strategy.push == "grad",  # copied into the model, never kept
            )
            self._finish_load(s, reply, loaded)

    def _load(self, s: int, reply: Message) -> None:
        """Load a whole reply of server ``s`` (its parameters) into the model."""
        self._finish_load(s, reply, self._copy_in(s, reply, {}))

    def _copy_in(self, s: int, part: Message, rows: dict[str, torch.Tensor]) -> set[str]:
        """Copy the packs in ``part`` (all or some of server ``s``'s) into the model; a pack
        that comes as rows (after a sync round, see ``Shard.round_reply``) updates only those
        (``rows`` keeps row numbers that came in an earlier part of the same reply). It writes
        to ``param.data`` (:func:`_flat`), which autograd does not record, so it needs no
        ``no_grad`` (whose decorator cost ~9 us a call here)."""
        if part.op != "params":
            raise ProtocolError(f"server {s} answered {part.op!r}, expected 'params'")
        for pack, members in self._packs[s]:
            numbers = part.tensors.get(pack.key + ROWS_SUFFIX)
            if numbers is not None:
                rows[pack.key] = numbers.clone()  # (it may be a view of a reused buffer)
            value = part.tensors.get(pack.key)
            if value is None:
                continue
            numbers = rows.pop(pack.key, None)
            if numbers is not None:
                self._copy_rows(s, pack, members, numbers, value)
                continue
            if value.numel() != pack.numel:
                raise ProtocolError(f"server {s} sent a wrong-size value for {pack.key}")
            for (pc, param), src in zip(members, pack.views(value)):
                _flat(param)[pc.start : pc.stop].copy_(src)
            if self.strategy.push == "delta":
                self._base[s, pack.key] = value
        return set(part.tensors)

    def _copy_rows(
        self, s: int, pack: Pack, members: list, numbers: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Copy the rows ``numbers`` of a one-piece pack (their elements in the piece, in
        ``value``) into the parameter (and, push="delta", into the last pulled values)."""
        if len(members) != 1:
            raise ProtocolError(f"server {s} sent rows for {pack.key}, which cannot take them")
        ((pc, param),) = members
        if value.dtype != param.dtype:
            raise ProtocolError(f"server {s} sent {value.dtype} rows for {pack.key}")
        width = row_width(param.shape)
        target = _flat(param)[pc.start : pc.stop]
        try:
            check_rows(numbers, width, pc.start, pc.numel)
            scatter_rows(target, numbers.to(param.device), width, pc.start, value.to(param.device))
            if self.strategy.push == "delta":
                scatter_rows(self._base[s, pack.key], numbers, width, pc.start, value)
        except ValueError as exc:
            raise ProtocolError(f"server {s} sent bad rows for {pack.key}: {exc}") from None

    def _finish_load(self, s: int, reply: Message, loaded: set[str]) -> None:
        missing = [pack.key for pack, _ in self._packs[s] if pack.key not in loaded]
        if missing:
            raise ProtocolError(f"server {s} sent no value for {missing[:5]}")
        self.versions[s] = reply.step


def _row_tables(
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    infos: list[ParamInfo],
    sparse: set[int],
) -> frozenset[str]:
    """The sparse tables whose pushes, steps and replies are rows only (their optimizer, the
    servers' or with push="delta" the local one, leaves untouched rows alone): left whole on
    each server, since every piece costs its own rows, frames and optimizer call per push,
    and the table itself travels only at registration, pulls and checkpoints."""
    names = group_names(optimizer)
    return frozenset(
        info.name
        for param, info in zip(params, infos)
        if id(param) in sparse
        and untouched_rows_stay(names[info.group], optimizer.param_groups[info.group])
    )


def _check_sparse_only(
    spec: OptimizerSpec, params: list[nn.Parameter], infos: list[ParamInfo], sparse: set[int]
) -> None:
    """Raise a UsageError if an optimizer that takes only sparse gradients (SparseAdam) holds
    a parameter whose gradient is dense (the servers would refuse it)."""
    for param, info in zip(params, infos):
        name = spec.names[info.group]
        if name in SPARSE_ONLY and id(param) not in sparse:
            raise UsageError(
                f"{name} takes only sparse gradients, but parameter {info.name!r} gets dense "
                "ones (only nn.Embedding/EmbeddingBag(..., sparse=True) give sparse ones); "
                "step the other parameters with a second optimizer: concord.distribute(model, "
                "[SparseAdam(table_params), Adam(other_params)], strategy)"
            )


def _packs(
    slots: list[tuple[Piece, nn.Parameter, ParamInfo]], sparse: set[int]
) -> list[tuple[Pack, list]]:
    """A shard's packs, each with its ``(piece, parameter)`` members in order (a piece of a
    parameter in ``sparse`` alone in its pack)."""
    packs = pack_pieces(
        [(pc.key, info.dtype, info.itemsize, pc.numel) for pc, _, info in slots],
        alone=frozenset(pc.key for pc, p, _ in slots if id(p) in sparse),
    )
    by_key = {pc.key: (pc, param) for pc, param, _ in slots}
    return [(pack, [by_key[key] for key, _, _ in pack.members]) for pack in packs]


def _pack_values(members: list[tuple[Piece, nn.Parameter]]) -> torch.Tensor:
    """A pack of the members' current values (one flat CPU tensor)."""
    return torch.cat([_flat(p)[pc.start : pc.stop] for pc, p in members]).cpu()


def _flat(param: torch.Tensor) -> torch.Tensor:
    return param.data.view(-1)


def _goodbye(channels: list[ClientChannel], rank: int) -> None:
    for chan in channels:
        try:
            chan.request(Message("goodbye", worker=rank), awaiting="goodbye", timeout=5)
        except Exception as exc:  # noqa: BLE001 - leaving must not fail the job
            log.debug("worker %d: goodbye to %s failed: %s", rank, chan.peer, exc)
        chan.close()
