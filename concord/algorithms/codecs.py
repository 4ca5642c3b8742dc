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
