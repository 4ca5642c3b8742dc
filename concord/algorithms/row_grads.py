"""Rows of a sparse gradient sent to one parameter-server piece (pure tensor arithmetic).

A worker pushes the gradient of an ``nn.Embedding(sparse=True)`` (or ``EmbeddingBag``) table
as the rows it touched (as TensorFlow's parameter servers take ``IndexedSlices``) instead of
the whole table: ``rows`` (sorted, unique row numbers of the parameter) and ``values`` (one
row each). A piece is a flat element range ``[start, start + numel)`` of the parameter and may
begin or end mid-row (see :func:`concord.algorithms.ps_plan.plan_shards`), so a row at either
end is cut to the piece: :meth:`RowGrad.add_to` adds only the elements the piece holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROWS_SUFFIX = "@rows"  # a push's key for the row numbers of pack ``key`` is ``key + ROWS_SUFFIX``


def row_width(shape: tuple[int, ...] | list[int]) -> int:
    """Elements per row (dimension 0) of a parameter of ``shape``; 1 for a vector."""
    width = 1
    for dim in shape[1:]:
        width *= dim
    return width


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
        width, lo, hi = self.width, self.start, self.start + self.numel
        first_whole, end_whole = -(-lo // width), hi // width  # rows wholly inside the piece
        rows, values = self.rows, self.values
        inner = (rows >= first_whole) & (rows < end_whole)
        whole = bool(inner.all())
        if end_whole > first_whole:
            region = target[first_whole * width - lo : end_whole * width - lo].view(-1, width)
            if whole:
                region.index_add_(0, rows - first_whole, values.to(target.dtype))
            else:
                region.index_add_(0, rows[inner] - first_whole, values[inner].to(target.dtype))
        if whole:
            return
        for i in (~inner).nonzero().flatten().tolist():  # at most a cut row at each end
            row = int(rows[i])
            a, b = max(row * width, lo), min((row + 1) * width, hi)
            target[a - lo : b - lo] += values[i, a - row * width : b - row * width]

    def dense(self, out: torch.Tensor) -> torch.Tensor:
        """The piece's whole gradient in ``out`` (zeros where no row fell)."""
        self.add_to(out.zero_())
        return out


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


def piece_elements(rows: torch.Tensor, width: int, start: int, numel: int) -> torch.Tensor:
    """The positions in the piece ``[start, start + numel)`` of the elements of ``rows`` that
    it holds, row by row (a reply's rows carry exactly these values)."""
    flat = (rows.unsqueeze(1) * width + torch.arange(width) - start).reshape(-1)
    return flat[(flat >= 0) & (flat < numel)]
