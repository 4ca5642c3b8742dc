"""Gradient compression for the wire (pure tensor functions, no communication).

``"fp16"`` and ``"bf16"`` cast each bucket for the wire and accumulate partial sums in the
gradient's own precision (fp32): the ring adds an fp16 partial sum to its fp32 values and
casts again before forwarding, so rounding happens once per hop, not once per addition.
Gradients are divided by the number of workers *before* the cast, so fp16 sums cannot
overflow where the fp32 mean would not. The result is the wire value, identical on every
worker. fp16 keeps 11 significant bits (relative error <= 2**-11 per rounding), bf16 keeps 8
(<= 2**-8) but has fp32's range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

CODECS = ("fp16", "bf16")


@dataclass(frozen=True)
class CastCodec:
    """Cast to ``wire_dtype`` for the wire; sums kept in the accumulator's dtype."""

    name: str
    wire_dtype: torch.dtype

    def wire_for(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype sent for gradients of ``dtype`` (never wider than the gradient)."""
        if not dtype.is_floating_point:
            return dtype
        if torch.finfo(dtype).bits <= torch.finfo(self.wire_dtype).bits:
            return dtype
        return self.wire_dtype

    def roundtrip(self, values: torch.Tensor) -> torch.Tensor:
        """What ``values`` become after one trip over the wire (for tests and error budgets)."""
        return values.to(self.wire_for(values.dtype)).to(values.dtype)


def codec(name: str | None) -> CastCodec | None:
    """The codec called ``name`` (None means no compression)."""
    if name is None:
        return None
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unknown compression {name!r}; choose one of {', '.join(CODECS)} or None")
    return CastCodec(name, dtypes[name])


@dataclass(frozen=True)
class PowerSGD:
    """Low-rank compression with error feedback (Vogels et al., 2019), for 2-D+ gradients.

    Each gradient matrix M (n x m, with its leftover error added) is sent as P = M Q
    (n x r) and Q' = M^T P (m x r) after P is averaged and orthonormalized: r(n + m) numbers
    instead of n m. What the approximation P Q'^T misses stays on the worker and is added to
    the next step's gradient, so nothing is lost, only delayed. Q' warm-starts the next step.
    Matrices too small to gain (r(n + m) >= n m) and 1-D tensors are sent as they are.
    """

    rank: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"PowerSGD(rank={self.rank!r}): must be a positive integer")

    def compresses(self, shape: tuple[int, ...]) -> bool:
        """Whether a gradient of ``shape`` goes low-rank (else it is sent as it is)."""
        if len(shape) < 2:
            return False
        n, m = shape[0], math.prod(shape[1:])
        r = min(self.rank, n, m)
        return r * (n + m) < n * m


def orthonormalize_(p: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the columns of ``p`` in place (a zero column stays zero)."""
    for i in range(p.shape[1]):
        col = p[:, i]
        if i:
            col.sub_(p[:, :i] @ (p[:, :i].T @ col))
        norm = col.norm()
        if norm > 0:
            col.div_(norm)
    return p


class PowerSGDState:
    """One bucket's matrices: their Q (shared across workers by a common seed) and errors."""

    def __init__(
        self,
        shapes: list[tuple[int, int]],
        rank: int,
        seed: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.q = [
            torch.randn(m, min(rank, n, m), generator=gen, dtype=dtype).to(device)
            for n, m in shapes
        ]
        self.error = [torch.zeros(n, m, dtype=dtype, device=device) for n, m in shapes]

    def reduce_(self, mats: list[torch.Tensor], mean_: Callable[[torch.Tensor], None]) -> None:
        """Replace each local matrix in ``mats`` by the workers' low-rank mean, in place.

        ``mean_(flat)`` must average a 1-D tensor across workers in place (the only
        communication: twice, with P and then with Q).
        """
        for m, err in zip(mats, self.error):
            m.add_(err)
        ps = [m @ q for m, q in zip(mats, self.q)]
        for p, flat in zip(ps, _mean_all(ps, mean_)):
            orthonormalize_(p.copy_(flat))
        qs = [m.T @ p for m, p in zip(mats, ps)]
        for q, new in zip(self.q, _mean_all(qs, mean_)):
            q.copy_(new)
        for m, p, q, err in zip(mats, ps, self.q, self.error):
            approx = p @ q.T
            torch.sub(m, approx, out=err)
            m.copy_(approx)


def _mean_all(parts: list[torch.Tensor], mean_: Callable[[torch.Tensor], None]):
    flat = torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0)
    mean_(flat)
    out, offset = [], 0
    for p in parts:
        out.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out
