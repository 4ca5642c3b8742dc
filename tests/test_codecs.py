"""Compression codecs: which dtype goes on the wire and what one trip costs."""

from __future__ import annotations

import pytest
import torch

from concord.algorithms.codecs import codec


def test_none_means_no_compression():
    assert codec(None) is None


def test_wire_dtypes():
    fp16, bf16 = codec("fp16"), codec("bf16")
    assert fp16.wire_for(torch.float32) == torch.float16
    assert bf16.wire_for(torch.float64) == torch.bfloat16
    assert fp16.wire_for(torch.bfloat16) == torch.bfloat16  # never wider than the gradient
    assert fp16.wire_for(torch.int64) == torch.int64


def test_roundtrip_by_hand():
    x = torch.tensor([1.0, 1 + 2**-12, 1 + 2**-10, 3.0e5])
    # fp16: 11 significant bits, so 1 + 2**-12 rounds to 1 and 1 + 2**-10 survives; 3e5 > 65504
    assert codec("fp16").roundtrip(x).tolist()[:3] == [1.0, 1.0, 1 + 2**-10]
    assert codec("fp16").roundtrip(x)[3].isinf()
    # bf16: 8 significant bits and fp32's range
    assert codec("bf16").roundtrip(x).tolist() == [1.0, 1.0, 1.0, 299008.0]


def test_unknown_codec():
    with pytest.raises(ValueError, match="fp16, bf16"):
        codec("int8")
