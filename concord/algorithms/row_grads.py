"""Rows of a sparse gradient sent to one parameter-server piece (pure tensor arithmetic).

A worker pushes the gradient of an ``nn.Embedding(sparse=True)`` (or ``EmbeddingBag``) table
as the rows it touched (as TensorFlow's parameter servers take ``IndexedSlices``) instead of
the whole table: ``rows`` (sorted, unique row numbers of the parameter) and ``values`` (one
row each). A piece is a flat element range ``[start, start + numel)`` of the parameter and may
begin or end mid-row (see :func:`concord.algorithms.ps_plan.plan_shards`), so a row at either
end is cut to the piece: :meth:`RowGrad.add_to` adds only the elements the piece holds.

A sync round whose optimizer changes only the rows with a gradient (plain SGD, Adagrad)
answers the same way: the rows any worker touched, and the piece's elements of them
(:func:`gather_rows`), which each worker copies into its table (:func:`scatter_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

ROWS_SUFFIX = "@rows"  # a push's key for the row numbers of pack ``key`` is ``key + ROWS_SUFFIX``


def untouched_rows_stay(optimizer: str, group: Mapping[str, Any]) -> bool:
    """Whether torch optimizer ``optimizer`` (a class name) with param group settings
    ``group`` leaves a row without gradient as it is: plain SGD (no momentum, no weight
    decay), Adagrad without weight decay and SparseAdam (lazy: it moves only the rows with a
    gradient); momentum and Adam's moments move every row."""
    if optimizer == "SparseAdam":
        return True
    if group.get("weight_decay", 0) != 0:
        return False
    return optimizer == "Adagrad" or (optimizer == "SGD" and group.get("momentum", 0) == 0)


def row_width(shape: tuple[int, ...] | list[int]) -> int:
    """Elements per row (dimension 0) of a parameter of ``shape``; 1 for a vector."""
    return math.prod(shape[1:])


def row_range(start: int, stop: int, width: int) -> tuple[int, int]:
    """The rows ``[first, end)`` that overlap flat elements ``[start, stop)``."""
    if stop <= start:
        return 0, 0
    return start // width, (stop - 1) // width + 1


@dataclass(frozen=True)
class RowGrad:
    """Rows of a gradient for the piece ``[start, start + numel)`` of a parameter whose rows
    have ``width`` elements: ``values[i]`` is row ``rows[i]`` (``values`` is ``(k, width)``)."""

    rows: torch.Tensor
    values: torch.Tensor
    width: int
    start: int
    numel: int

    @classmethod
    def checked(
        cls, rows: torch.Tensor, values: torch.Tensor, width: int, start: int, numel: int
    ) -> RowGrad:
        """A RowGrad from untrusted tensors; ValueError says what is wrong with them."""
        check_rows(rows, width, start, numel)
        if values.numel() != rows.numel() * width:
            raise ValueError(
                f"{rows.numel()} rows of {width} elements need {rows.numel() * width} values, "
                f"got {values.numel()}"
            )
        return cls(rows, values.reshape(rows.numel(), width), width, start, numel)

    def add_to(self, target: torch.Tensor) -> None:
        """Add the elements of these rows that the piece holds to ``target`` (its flat
        gradient, ``numel`` long)."""
        head, first, tail, whole = _layout(self.rows, self.width, self.start, self.numel)
        if self.rows[whole].numel():
            rows_view = _whole_rows(target, first, self.width, self.start)
            rows_view.index_add_(0, self.rows[whole] - first, self.values[whole].to(target.dtype))
        for i in ([0] if head else []) + ([self.rows.numel() - 1] if tail else []):
            at, offset, count = _cut_span(int(self.rows[i]), self.width, self.start, self.numel)
            target[at : at + count] += self.values[i, offset : offset + count]

    def dense(self, out: torch.Tensor) -> torch.Tensor:
        """The piece's whole gradient in ``out`` (zeros where no row fell)."""
        self.add_to(out.zero_())
        return out

    def copy(self) -> RowGrad:
        """A copy that owns its tensors (a received one may view a reused buffer)."""
        return replace(self, rows=self.rows.clone(), values=self.values.clone())

    @staticmethod
    def merged(parts: Sequence[RowGrad]) -> RowGrad:
        """The sum of ``parts`` (rows of one piece): each row once, its values summed."""
        if len(parts) == 1:
            return parts[0]
        rows = torch.cat([p.rows for p in parts])
        union, where = torch.unique(rows, sorted=True, return_inverse=True)
        values = torch.cat([p.values for p in parts])
        summed = values.new_zeros(len(union), parts[0].width).index_add_(0, where, values)
        return replace(parts[0], rows=union, values=summed)

    def sparse_rows(self) -> torch.Tensor:
        """For a piece of whole rows (``start`` and ``numel`` multiples of ``width``): the
        gradient as a coalesced sparse tensor over the piece's rows (``numel // width`` by
        ``width``, one index per row). torch's SparseAdam and sparse Adagrad step it ~9x faster
        than :meth:`sparse`'s one index per element (a 100k x 64 table, 2,500 rows: 3.9 vs
        33.7 ms and 1.7 vs 16.0 ms on this VM)."""
        if self.start % self.width or self.numel % self.width:
            raise ValueError(f"piece [{self.start}, +{self.numel}) is not whole rows")
        return torch.sparse_coo_tensor(
            (self.rows - self.start // self.width).unsqueeze(0),
            self.values,
            (self.numel // self.width, self.width),
            is_coalesced=True,
            check_invariants=False,
        )

    def sparse(self) -> torch.Tensor:
        """The piece's gradient as a coalesced 1-D sparse tensor over its ``numel`` elements
        (for an optimizer that then updates only the elements these rows hold)."""
        head, _, tail, whole = _layout(self.rows, self.width, self.start, self.numel)
        device, width = self.rows.device, self.width
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (positions, values) in order

        def cut(i: int) -> None:  # the piece's part of a row cut at one of its ends
            at, offset, count = _cut_span(int(self.rows[i]), width, self.start, self.numel)
            span = torch.arange(at, at + count, device=device)
            parts.append((span, self.values[i, offset : offset + count]))

        if head:
            cut(0)
        if self.rows[whole].numel():
            span = torch.arange(width, device=device)
            at = (self.rows[whole].unsqueeze(1) * width - self.start + span).reshape(-1)
            parts.append((at, self.values[whole].reshape(-1)))
        if tail:
            cut(self.rows.numel() - 1)
        index = torch.cat([at for at, _ in parts]) if parts else self.rows.new_zeros(0)
        value = torch.cat([v for _, v in parts]) if parts else self.values.new_zeros(0)
        return torch.sparse_coo_tensor(
            index.unsqueeze(0), value, (self.numel,), is_coalesced=True, check_invariants=False
        )


def check_rows(rows: torch.Tensor, width: int, start: int, numel: int) -> None:
    """Untrusted row numbers for the piece ``[start, start + numel)`` of a parameter whose rows
    have ``width`` elements: 1-D int64, sorted, unique, each overlapping the piece."""
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise ValueError(
            f"row numbers must be a 1-D int64 tensor, got {rows.dtype} {list(rows.shape)}"
        )
    if width < 1:
        raise ValueError("a parameter without elements per row takes no rows")
    first, end = row_range(start, start + numel, width)
    if rows.numel():
        if int(rows[0]) < first or int(rows[-1]) >= end:
            raise ValueError(f"row numbers must lie in [{first}, {end}) for this piece")
        if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            raise ValueError("row numbers must be sorted and unique")


def _layout(rows: torch.Tensor, width: int, start: int, numel: int) -> tuple[int, int, int, slice]:
    """How the piece's elements of ``rows`` (checked) lie in it: ``(head, first, tail,
    whole)`` — ``head`` elements of a row cut at the piece's start (at its beginning), whole
    rows from row ``first`` on (``rows[whole]``), ``tail`` elements of a row cut at its end."""
    k = rows.numel()
    if not k:
        return 0, 0, 0, slice(0, 0)
    lo, hi = start, start + numel
    first, end = -(-lo // width), hi // width  # the rows wholly inside: [first, end)
    if first > end:  # the piece lies inside one row, which is cut at both ends
        return numel, first, 0, slice(1, 1)
    head = first * width - lo if int(rows[0]) < first else 0
    tail = hi - end * width if int(rows[-1]) >= end else 0
    return head, first, tail, slice(int(head > 0), k - int(tail > 0))


def _cut_span(row: int, width: int, start: int, numel: int) -> tuple[int, int, int]:
    """Where the piece's part of a row cut at one of its ends lies: ``(at, offset, count)``,
    ``count`` elements from position ``at`` in the piece and ``offset`` in the row."""
    a, b = max(row * width, start), min((row + 1) * width, start + numel)
    return a - start, a - row * width, b - a


def rows_numel(rows: torch.Tensor, width: int, start: int, numel: int) -> int:
    """How many of the piece's elements ``rows`` (checked) cover."""
    head, _, tail, whole = _layout(rows, width, start, numel)
    return head + rows[whole].numel() * width + tail


def gather_rows(
    flat: torch.Tensor,
    rows: torch.Tensor,
    width: int,
    start: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The elements of ``rows`` that the piece ``flat`` (elements ``[start, start + len)`` of
    a parameter) holds, row by row, as one flat tensor (a reply's values), in ``out`` if
    given (:func:`rows_numel` long)."""
    numel = flat.numel()
    head, first, tail, inside = _layout(rows, width, start, numel)
    whole = rows[inside]
    need = head + whole.numel() * width + tail
    out = flat.new_empty(need) if out is None else out
    if out.numel() != need:
        raise ValueError(f"{rows.numel()} rows take {need} values in this piece, not {out.numel()}")
    if head:  # (each part goes straight into ``out``: no second copy)
        out[:head] = flat[:head]
    if whole.numel():
        block = out[head : head + whole.numel() * width].view(-1, width)
        rows_view = _whole_rows(flat, first, width, start)
        torch.index_select(rows_view, 0, whole - first, out=block)
    if tail:
        out[need - tail :] = flat[numel - tail :]
    return out


def scatter_rows(
    flat: torch.Tensor, rows: torch.Tensor, width: int, start: int, values: torch.Tensor
) -> None:
    """Write :func:`gather_rows`'s ``values`` back into the piece ``flat``; ValueError if their
    count does not fit ``rows`` (which must be checked, see :func:`check_rows`)."""
    numel = flat.numel()
    head, first, tail, inside = _layout(rows, width, start, numel)
    whole = rows[inside]
    need = head + whole.numel() * width + tail
    if values.numel() != need:
        raise ValueError(
            f"{rows.numel()} rows need {need} values in this piece, got {values.numel()}"
        )
    flat[:head] = values[:head]
    if whole.numel():
        block = values[head : head + whole.numel() * width].view(-1, width)
        _whole_rows(flat, first, width, start).index_copy_(0, whole - first, block.to(flat.dtype))
    if tail:
        flat[numel - tail :] = values[values.numel() - tail :]


def _whole_rows(flat: torch.Tensor, first: int, width: int, start: int) -> torch.Tensor:
    """The rows wholly inside the piece ``flat``, from row ``first`` on, as a ``(k, width)``
    view."""
    offset = first * width - start
    count = (flat.numel() - offset) // width
    return flat[offset : offset + count * width].view(count, width)
