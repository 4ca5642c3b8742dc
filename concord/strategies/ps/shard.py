"""One server's shard: its parameter pieces, their optimizer, and registration checks.

Pieces are 1-D tensors (elements ``[start, stop)`` of a flattened parameter, see
:func:`concord.algorithms.ps_plan.plan_shards`). Worker 0 registers their initial values;
every other worker's parameter list is checked against worker 0's and a mismatch names the
parameter. Untrusted input (names, shapes, dtypes, optimizer settings) is validated here.

Pushes and replies carry packs (:func:`concord.algorithms.ps_plan.pack_pieces`): the shard
keeps each pack as one flat tensor and every piece as a view of it, so a reply sends the packs
as they are and each piece steps its own optimizer state as before.

A sparse table's piece whose optimizer leaves untouched rows as they are can be answered as
rows (:mod:`concord.algorithms.row_grads`): after a sync round, the rows the round touched
(:meth:`Shard.round_reply`); in async mode, the rows changed since the version the worker
holds (:meth:`Shard.reply_since`; the shard records the version each row last changed at).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim import optimizer as torch_optimizer

from concord.algorithms.ps_plan import (
    SPARSE_ONLY,
    OptimizerSpec,
    Pack,
    Piece,
    pack_pieces,
    plain_settings,
)
from concord.algorithms.ps_state import (
    PieceStates,
    check_state,
    fresh_state,
    settings_by_param,
    stored,
)
from concord.algorithms.row_grads import (
    ROWS_SUFFIX,
    RowGrad,
    gather_rows,
    row_range,
    row_width,
    rows_numel,
    untouched_rows_stay,
)
from concord.comm.wire import DTYPES, WireError
from concord.strategies.ps.config import pushed_dtype

_META_KEYS = {"name", "shape", "dtype", "group", "start", "stop", "sparse"}
_FUSED_DTYPES = {"float32", "float64"}
_GLOBAL_STEP_HOOKS = tuple(  # (torch's registries of hooks on every optimizer's step)
    getattr(torch_optimizer, name, None)
    for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
)


def piece_meta(
    piece: Piece, shape: tuple[int, ...], dtype: str, group: int, sparse: bool = False
) -> dict[str, Any]:
    """How a worker describes one piece at registration (``sparse``: of a parameter whose
    gradient is sparse, which travels in a pack of its own)."""
    return {
        "name": piece.name,
        "shape": list(shape),
        "dtype": dtype,
        "group": group,
        "start": piece.start,
        "stop": piece.stop,
        "sparse": sparse,
    }


def step_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, past torch's profiling wrapper (``Optimizer.profile_hook_step``)
    when no step hook is set: the wrapper opens a ``record_function`` range on every call,
    ~12 us of a 1 MB sync round here, and runs the hooks, which a server never registers.
    With a hook set, or a torch whose wrapper looks different, the plain ``step()``."""
    step = type(optimizer).step
    bare = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    hooks = (
        getattr(optimizer, "_optimizer_step_pre_hooks", None),
        getattr(optimizer, "_optimizer_step_post_hooks", None),
        *_GLOBAL_STEP_HOOKS,
    )
    if bare is None or any(h is None or h for h in hooks):
        optimizer.step()
    else:
        bare(optimizer)


def _key(meta: dict[str, Any]) -> str:
    return Piece(meta["name"], meta["start"], meta["stop"], 0).key


def _check_meta(metas: Any) -> list[dict[str, Any]]:
    if not isinstance(metas, list):
        raise WireError("header", f"params must be a list, got {type(metas).__name__}")
    for meta in metas:
        ok = isinstance(meta, dict) and set(meta) == _META_KEYS
        ok = ok and isinstance(meta["name"], str) and meta["dtype"] in DTYPES
        ok = ok and all(type(meta[k]) is int and meta[k] >= 0 for k in ("group", "start", "stop"))
        ok = ok and isinstance(meta["shape"], list) and type(meta["sparse"]) is bool
        ok = ok and all(type(d) is int and d >= 0 for d in meta["shape"])
        if not ok or meta["start"] > meta["stop"]:
            raise WireError("header", f"bad parameter description {meta!r}")
    return metas


class Shard:
    """The pieces one server holds, their current values, and (push="grad") an optimizer."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.config: dict[str, Any] | None = None
        self.metas: list[dict[str, Any]] = []
        self.values: dict[str, torch.Tensor] = {}  # piece key -> a view of its pack
        self.packs: tuple[Pack, ...] = ()
        self.flats: dict[str, torch.Tensor] = {}  # pack key -> its flat tensor
        self.row_packs: dict[str, tuple[int, int, int]] = {}  # sparse table's pack -> layout
        self._row_groups: dict[str, int] = {}  # one-piece pack -> its piece's param group
        self._scratch: dict[str, torch.Tensor] = {}  # pack key -> a gradient densified (async)
        self.changed: dict[str, torch.Tensor] = {}  # async: sparse pack -> version, per row
        self.optimizer: torch.optim.Optimizer | None = None
        self._groups: dict[int, dict[str, Any]] = {}  # spec's group index -> the built group
        self._names: tuple[str, ...] = ()  # each group's optimizer class
        self.version = 0

    @property
    def registered(self) -> bool:
        return self.config is not None

    def register_first(
        self, config: dict[str, Any], metas: Any, spec: Any, tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Worker 0's registration: the pieces, their initial values, the optimizer."""
        metas = _check_meta(metas)
        keys = [_key(m) for m in metas]
        if len(set(keys)) != len(keys):
            raise WireError("header", "a parameter piece is described twice")
        self.check_tensors(tensors, "initial value", metas, require_all=True)
        self.packs = pack_pieces(
            [
                (key, m["dtype"], DTYPES[m["dtype"]].itemsize, m["stop"] - m["start"])
                for key, m in zip(keys, metas)
            ],
            alone=frozenset(key for key, m in zip(keys, metas) if m["sparse"]),
        )
        by_key = dict(zip(keys, metas))
        self.row_packs, self._row_groups = {}, {}
        for pack in self.packs:  # (row width, start, numel) of a sparse table's piece
            m = by_key[pack.members[0][0]]
            if m["sparse"]:  # (alone in its pack)
                layout = (row_width(m["shape"]), m["start"], m["stop"] - m["start"])
                self.row_packs[pack.key] = layout
                self._row_groups[pack.key] = m["group"]
        values = {}
        for pack in self.packs:
            flat = self.flats[pack.key] = torch.empty(pack.numel, dtype=DTYPES[pack.dtype])
            for (key, _, _), view in zip(pack.members, pack.views(flat)):
                values[key] = view.copy_(tensors[key].reshape(-1))
        # a sparse table's piece of whole rows is kept as rows x width, so that its optimizer
        # steps a sparse gradient of one index per row (see RowGrad.sparse_rows)
        for pack in self.packs:
            width, start, numel = self.row_packs.get(pack.key, (0, 0, 0))
            if width and not start % width and not numel % width:
                ((key, _, _),) = pack.members
                values[key] = values[key].view(numel // width, width)
        if config.get("push") == "grad" and values:
            opt_spec = _spec(spec)
            by_group: list[list[torch.Tensor]] = [[] for _ in opt_spec.groups]
            for meta, key in zip(metas, keys):
                if meta["group"] >= len(by_group):
                    raise WireError("header", f"{meta['name']}: no param group {meta['group']}")
                name = opt_spec.names[meta["group"]]
                if name in SPARSE_ONLY and not meta["sparse"]:
                    raise WireError(
                        "optimizer", f"{meta['name']}: {name} steps only sparse-gradient tables"
                    )
                by_group[meta["group"]].append(values[key])
            # torch's fused kernels take no sparse gradients; half precision keeps torch's
            # default arithmetic (one process's, to float32 rounding)
            plain = {m["group"] for m in metas if m["sparse"] or m["dtype"] not in _FUSED_DTYPES}
            built = opt_spec.build(by_group, set(range(len(by_group))) - plain)
            self.optimizer, self._groups = built.optimizer, built.groups
            self._names = opt_spec.names
        self.config, self.metas, self.values = dict(config), metas, values
        if config.get("mode") == "async":
            for key, (width, start, numel) in self.row_packs.items():
                if width:
                    first, end = row_range(start, start + numel, width)
                    self.changed[key] = torch.zeros(end - first, dtype=torch.int64)

    def check_worker(self, worker: int, config: Any, metas: Any) -> None:
        """Raise a WireError naming the first difference from worker 0's registration."""
        assert self.config is not None
        if config != self.config:
            diff = sorted(k for k in self.config if self.config.get(k) != (config or {}).get(k))
            raise WireError(
                "config",
                f"worker {worker} uses ParameterServer settings {diff} = "
                f"{[(config or {}).get(k) for k in diff]} but worker 0 registered "
                f"{[self.config[k] for k in diff]}; every worker must use the same strategy",
            )
        metas = _check_meta(metas)
        for i in range(max(len(metas), len(self.metas))):
            mine = metas[i] if i < len(metas) else None
            ref = self.metas[i] if i < len(self.metas) else None
            if mine == ref:
                continue
            if mine is None or ref is None or mine["name"] != ref["name"]:
                got = mine and mine["name"]
                want = ref and ref["name"]
                raise WireError(
                    "shape",
                    f"server {self.rank} piece {i}: worker {worker} has parameter {got!r} but "
                    f"worker 0 registered {want!r}; every worker must build the same model",
                )
            raise WireError(
                "shape",
                f"parameter {mine['name']!r}: worker {worker} has dtype {mine['dtype']} shape "
                f"{mine['shape']} (group {mine['group']}) but worker 0 registered dtype "
                f"{ref['dtype']} shape {ref['shape']} (group {ref['group']})",
            )

    def check_tensors(
        self,
        tensors: Mapping[str, torch.Tensor],
        what: str,
        metas: list[dict[str, Any]],
        require_all: bool = False,
    ) -> None:
        """Every tensor must name one of the pieces ``metas`` describe, with its dtype and
        size (registration; pushes carry packs, see :meth:`check_packs`)."""
        expected = {_key(m): m for m in metas}
        for key, tensor in tensors.items():
            meta = expected.get(key)
            if meta is None:
                raise WireError("shape", f"{what} {key!r} is not a piece of server {self.rank}")
            _check_value(what, key, tensor, meta["dtype"], meta["stop"] - meta["start"])
        missing = [k for k in expected if k not in tensors] if require_all else []
        if missing:
            raise WireError("shape", f"missing {what} for {missing[:5]}")

    def check_packs(self, tensors: Mapping[str, torch.Tensor], what: str) -> None:
        """A push carries every pack of this shard, each with its dtype and size."""
        if tensors.keys() != self.flats.keys():
            raise WireError(
                "shape",
                f"a {what} push to server {self.rank} must carry packs {list(self.flats)[:5]}, "
                f"got {list(tensors)[:5]}",
            )
        for pack in self.packs:
            _check_value(what, pack.key, tensors[pack.key], pack.dtype, pack.numel)

    def check_push(
        self, tensors: Mapping[str, torch.Tensor], what: str
    ) -> dict[str, torch.Tensor | RowGrad]:
        """A push's packs (gradients or deltas), checked as :meth:`check_packs` checks them,
        except that a sparse table's pack may come as rows: its key carries the rows' values
        and its key + ``@rows`` their row numbers (it becomes a
        :class:`~concord.algorithms.row_grads.RowGrad`)."""
        packs = dict(tensors)
        rows = {}
        for key in [k for k in tensors if k.endswith(ROWS_SUFFIX)]:
            rows[key[: -len(ROWS_SUFFIX)]] = packs.pop(key)
        if self.config and self.config.get("compression"):  # back to full precision to sum
            packs = {key: self._widened(key, value) for key, value in packs.items()}
        if not rows:
            self.check_packs(packs, what)
            return packs
        if packs.keys() != self.flats.keys() or not rows.keys() <= packs.keys():
            raise WireError(
                "shape",
                f"a {what} push to server {self.rank} must carry packs {list(self.flats)[:5]} "
                f"(and row numbers for some), got {list(tensors)[:5]}",
            )
        out: dict[str, torch.Tensor | RowGrad] = {}
        for pack in self.packs:
            value = packs[pack.key]
            if pack.key not in rows:
                _check_value(what, pack.key, value, pack.dtype, pack.numel)
                out[pack.key] = value
                continue
            layout = self.row_packs.get(pack.key)
            if layout is None:
                raise WireError(
                    "shape",
                    f"{what} {pack.key!r} is not a sparse table's piece: it cannot come as rows",
                )
            _check_value(what, pack.key, value, pack.dtype, value.numel())
            try:
                out[pack.key] = RowGrad.checked(rows[pack.key], value, *layout)
            except ValueError as exc:
                raise WireError("shape", f"{what} {pack.key!r}: {exc}") from None
        return out

    def _widened(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """A pack compressed as the config says (:func:`pushed_dtype`) in its registered
        dtype; anything else as it came (the checks then judge it)."""
        flat = self.flats.get(key)
        if flat is None or flat.dtype == value.dtype:
            return value
        assert self.config is not None
        pushed = pushed_dtype(self.config.get("compression"), flat.dtype)
        return value.to(flat.dtype) if value.dtype == pushed else value

    def absent_pieces(self, indices: Any) -> frozenset[str]:
        """The piece keys a push says it has no gradient for (``meta["absent"]``: indices in
        registration order; their part of the packs is zero)."""
        if indices is None:
            return frozenset()
        if not isinstance(indices, list) or not all(
            type(i) is int and 0 <= i < len(self.metas) for i in indices
        ):
            raise WireError("header", f"bad list of absent pieces {str(indices)[:200]}")
        return frozenset(_key(self.metas[i]) for i in indices)

    def piece_grads(
        self, packs: Mapping[str, torch.Tensor | RowGrad], absent: frozenset[str] = frozenset()
    ) -> dict[str, torch.Tensor]:
        """Each piece's gradient as a view of its (checked) pack, less the ``absent`` ones. A
        pack that came as rows becomes a sparse gradient where the optimizer then changes only
        those rows (:meth:`keeps_untouched_rows`: no step touches the rest of the table), else
        a dense one (in a buffer reused push to push)."""
        grads: dict[str, torch.Tensor] = {}
        for pack in self.packs:
            flat = packs[pack.key]
            if isinstance(flat, RowGrad) and self.keeps_untouched_rows(pack.key):
                ((key, _, _),) = pack.members
                if key not in absent:
                    by_row = self.values[key].dim() == 2  # (kept rows x width)
                    grads[key] = flat.sparse_rows() if by_row else flat.sparse()
                continue
            if isinstance(flat, RowGrad):
                buffer = self._scratch.get(pack.key)
                if buffer is None:
                    buffer = self._scratch[pack.key] = torch.empty_like(self.flats[pack.key])
                flat = flat.dense(buffer)
            for (key, _, _), view in zip(pack.members, pack.views(flat)):
                if key not in absent:
                    grads[key] = view
        return grads

    def pieces_in(self, pack_keys: Iterable[str]) -> list[str]:
        """The keys of the pieces in the packs ``pack_keys``."""
        wanted = set(pack_keys)
        return [key for pack in self.packs if pack.key in wanted for key, _, _ in pack.members]

    def apply_grads(
        self, grads: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None
    ) -> None:
        """One optimizer step; pieces without a gradient are skipped (grad None). With
        ``keys``, only those pieces step and the version stays (the caller advances it once
        every piece has stepped: the optimizers are element-wise, so the result is the same)."""
        whole = keys is None
        keys = list(self.values) if keys is None else list(keys)
        if self.optimizer is not None:
            for key in keys:
                grad = grads.get(key)
                value = self.values[key]
                if grad is not None and not grad.is_sparse:
                    grad = grad.reshape(value.shape)
                value.grad = None if grad is None else grad.to(value.dtype)
            step_optimizer(self.optimizer)
            for key in keys:
                self.values[key].grad = None
        if whole:
            self.version += 1

    def apply_deltas(self, deltas: Mapping[str, torch.Tensor | RowGrad]) -> None:
        """Add a worker's parameter change (one tensor per pack, checked; a sparse table's
        pack may come as the rows that changed) to the shard."""
        for key, delta in deltas.items():
            if isinstance(delta, RowGrad):
                delta.add_to(self.flats[key])
            else:
                self.flats[key].add_(delta)
        self.version += 1

    def set_hyperparameters(self, settings: Any) -> None:
        """Follow a worker's changed optimizer settings (e.g. an LR schedule)."""
        if self.optimizer is None or settings is None:
            return
        spec = _spec({"names": list(self._names), "groups": settings})
        for index, group in self._groups.items():
            group.update(plain_settings(spec.groups[index]))

    def export_state(self) -> PieceStates:
        """Each piece's optimizer state (copies) by its index in registration order."""
        if self.optimizer is None:
            return {}
        out = {}
        for i, meta in enumerate(self.metas):
            state = self.optimizer.state.get(self.values[_key(meta)], {})
            if state:  # (a tensor, or SparseAdam's int step count)
                out[i] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
        return out

    def import_state(self, states: PieceStates) -> None:
        """Replace the optimizer's state with ``states`` (piece index -> state; a piece left
        out starts fresh). Everything is checked before anything changes."""
        if self.optimizer is None:
            if states:
                raise WireError("request", "push='delta' keeps the optimizer state on the workers")
            return
        settings = settings_by_param(self.optimizer)
        new = {}
        for i, meta in enumerate(self.metas):
            value = self.values[_key(meta)]
            hp = settings[id(value)]
            state = states.get(i, {})
            layout = hp.layout()
            try:
                check_state(f"server {self.rank} piece {_key(meta)}", state, layout, value.numel())
            except ValueError as exc:
                raise WireError("shape", str(exc)) from None
            if not state:
                new[value] = fresh_state(hp.name, hp.settings, value)
                continue
            new[value] = {k: stored(v, layout[k], value) for k, v in state.items()}
        self.optimizer.state.clear()
        self.optimizer.state.update(new)

    def load_checkpoint(
        self, packs: Mapping[str, torch.Tensor], states: PieceStates, settings: Any
    ) -> None:
        """Take a checkpoint: optimizer ``settings`` (as a push's ``hp``), the pieces' state
        (:meth:`import_state`) and new values for every pack (checked by
        :meth:`check_packs`). A state that does not fit changes nothing."""
        groups = [dict(g) for g in self.optimizer.param_groups] if self.optimizer else []
        self.set_hyperparameters(settings)  # (the state's layout depends on them)
        try:
            self.import_state(states)
        except WireError:
            for group, before in zip(self.optimizer.param_groups, groups):  # type: ignore[union-attr]
                group.update(before)
            raise
        for key, value in packs.items():
            self.flats[key].copy_(value)

    def mark_changed(
        self, packs: Mapping[str, torch.Tensor | RowGrad], absent: frozenset[str]
    ) -> None:
        """Async, after a push's step (or delta): record the shard's version as the one at
        which each row of a sparse table's piece the push changed last changed (the rows it
        came with when nothing else changes, see :meth:`rows_only`, else every row)."""
        for key, changed in self.changed.items():
            grad = packs[key]
            if self.pieces_in([key])[0] in absent:  # no gradient: the optimizer skipped it
                continue
            if isinstance(grad, RowGrad) and self.rows_only(key):
                changed[grad.rows - grad.start // grad.width] = self.version
            else:
                changed.fill_(self.version)

    def reply_since(self, since: int, copy: bool) -> dict[str, torch.Tensor]:
        """Async: the packs for workers that hold the shard as it was at version ``since``
        (or later): a sparse table's piece as the rows changed after ``since`` (``key +
        "@rows"`` their numbers, ``key`` the piece's elements of them, a new buffer) when that
        is under half the piece's bytes (row by row, gathering and scattering cost 2-3x a
        whole copy per byte), everything else as :meth:`snapshot` sends it."""
        tensors = {}
        for key, flat in self.flats.items():
            changed = self.changed.get(key)
            if changed is not None and self.rows_only(key):  # (else every row changes)
                width, start, numel = self.row_packs[key]
                numbers = changed.gt(since).nonzero().squeeze(1).add_(start // width)
                values = rows_numel(numbers, width, start, numel)
                if 2 * (values * flat.element_size() + numbers.nbytes) < flat.nbytes:
                    tensors[key + ROWS_SUFFIX] = numbers
                    tensors[key] = gather_rows(flat, numbers, width, start)
                    continue
            tensors[key] = flat.clone() if copy else flat
        return tensors

    def rows_only(self, key: str) -> bool:
        """Whether a push that carries rows for pack ``key`` changes only those rows: a delta
        (push="delta": the shard has no optimizer), or a gradient under an optimizer that
        :meth:`keeps_untouched_rows`."""
        return self.optimizer is None or self.keeps_untouched_rows(key)

    def keeps_untouched_rows(self, key: str) -> bool:
        """Whether pack ``key`` is one piece whose optimizer leaves a row without gradient as it
        is (plain SGD: no momentum, no weight decay; Adagrad without weight decay), so that
        only the rows a round's gradients touched change."""
        if key not in self.row_packs or self.optimizer is None:
            return False
        index = self._row_groups[key]
        group = self._groups.get(index)
        return group is not None and untouched_rows_stay(self._names[index], group)

    def round_reply(
        self, rows: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], Callable[[Iterable[str]], None]]:
        """A sync round's reply before the step: the live packs, except that a pack that
        :meth:`keeps_untouched_rows` carries only the rows ``rows[key]`` the round touched:
        ``key + "@rows"`` their numbers, ``key`` (a new buffer) the piece's elements of them
        (see :func:`~concord.algorithms.row_grads.gather_rows`), which ``fill(keys)`` writes
        once the pieces of the packs ``keys`` stepped."""
        tensors, picked = {}, {}
        for key, flat in self.flats.items():
            numbers = rows.get(key)
            if numbers is None or not self.keeps_untouched_rows(key):
                tensors[key] = flat
                continue
            width, start, numel = self.row_packs[key]
            picked[key] = numbers
            tensors[key + ROWS_SUFFIX] = numbers
            tensors[key] = flat.new_empty(rows_numel(numbers, width, start, numel))

        def fill(keys: Iterable[str]) -> None:
            for key in keys:
                if key in picked:
                    width, start, _ = self.row_packs[key]
                    gather_rows(self.flats[key], picked[key], width, start, out=tensors[key])

        return tensors, fill

    def snapshot(self, copy: bool) -> dict[str, torch.Tensor]:
        """The current packs (copies when they may change while a reply is in flight)."""
        if copy:
            return {k: v.clone() for k, v in self.flats.items()}
        return dict(self.flats)


def _check_value(what: str, key: str, tensor: torch.Tensor, dtype: str, numel: int) -> None:
    if tensor.dtype != DTYPES[dtype]:
        raise WireError("dtype", f"{what} {key!r} is {tensor.dtype}, expected {dtype}")
    if tensor.numel() != numel:
        raise WireError("shape", f"{what} {key!r} has {tensor.numel()} elements, expected {numel}")


def _spec(data: Any) -> OptimizerSpec:
    try:
        return OptimizerSpec.from_json(data)
    except (TypeError, ValueError) as exc:
        raise WireError("optimizer", str(exc)) from None
