"""Compression codecs: which dtype goes on the wire and what one trip costs."""

from __future__ import annotations

import pytest
import torch

from concord.algorithms.codecs import PowerSGD, PowerSGDState, codec, orthonormalize_


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


def test_powersgd_compresses_only_where_it_gains():
    psgd = PowerSGD(rank=2)
    assert not psgd.compresses((4, 4))  # 2 * (4 + 4) = 16, not < 16
    assert psgd.compresses((8, 8))  # 32 < 64
    assert psgd.compresses((3, 2, 5))  # n=3, m=10: 26 < 30
    assert not psgd.compresses((100,))
    with pytest.raises(ValueError, match="rank=0"):
        PowerSGD(rank=0)


def test_orthonormalize_by_hand():
    p = torch.tensor([[3.0, 1.0, 0.0], [4.0, 2.0, 0.0]])
    orthonormalize_(p)
    # column 0 = (3, 4) / 5; column 1 = (1, 2) minus its projection, normalized; column 2 zero
    assert torch.allclose(p[:, 0], torch.tensor([0.6, 0.8]))
    assert torch.allclose(p[:, 1], torch.tensor([-0.8, 0.6]), atol=1e-6)
    assert torch.equal(p[:, 2], torch.zeros(2))


def test_powersgd_full_rank_is_exact_and_error_feedback_telescopes():
    gen = torch.Generator().manual_seed(0)
    ident = lambda t: None  # noqa: E731 - one worker: the mean of one is itself
    m = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    state = PowerSGDState([(4, 3)], rank=3, seed=1, dtype=torch.float64)
    got = m.clone()
    state.reduce_([got], ident)
    torch.testing.assert_close(got, m)  # rank 3 of a 4 x 3 matrix: nothing is lost
    # rank 1: each step sends an approximation, keeps the rest; sent + kept = all inputs
    state = PowerSGDState([(4, 3)], rank=1, seed=1, dtype=torch.float64)
    inputs = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(5)]
    sent = torch.zeros(4, 3, dtype=torch.float64)
    for g in inputs:
        x = g.clone()
        state.reduce_([x], ident)
        assert torch.linalg.matrix_rank(x) == 1
        sent += x
    torch.testing.assert_close(sent + state.error[0], sum(inputs))
