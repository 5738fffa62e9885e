"""The quantized-weight form: round trips, act-order permutation, and the reference linear."""

import pytest
import torch

from meshserve.kernels.quant_weight import (
    QuantWeight,
    dequantize,
    pack_int4,
    quant_linear_reference,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)


def test_int4_packing_round_trips_with_the_even_column_in_the_low_nibble():
    q = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (3, 4)
    assert torch.equal(packed[:, 0] & 0xF, q[:, 0])
    assert torch.equal(unpack_int4(packed), q)


def test_int8_per_channel_is_within_half_a_step_of_the_weight():
    w = torch.randn(16, 64)
    qw = quantize_int8(w)
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert (dequantize(qw) - w).abs().le(step / 2 + 1e-6).all()
    assert qw.nbytes == 16 * 64 + 16 * 4


def test_int4_groups_are_within_half_a_step_and_keep_zero_exact():
    w = torch.randn(8, 256)
    w[:, 5] = 0.0
    qw = quantize_int4(w, group_size=128)
    assert qw.scales.shape == (8, 2)
    err = (dequantize(qw) - w).abs()
    assert err.le(qw.scales.repeat_interleave(128, dim=1) / 2 + 1e-6).all()
    assert err[:, 5].max() == 0


def test_act_order_perm_computes_the_same_linear():
    w = torch.randn(4, 32)
    qw = quantize_int4(w, group_size=8)
    perm = torch.randperm(32)
    # the same integers read in permuted order: column j of the kernel's matrix is column perm[j]
    shuffled = QuantWeight(4, pack_int4(unpack_int4(qw.qweight)), qw.scales, qw.zeros, 8, perm)
    x = torch.randn(3, 32)
    expected = x[:, perm] @ dequantize(shuffled, original_order=False).T
    torch.testing.assert_close(quant_linear_reference(x, shuffled), expected)


def test_a_group_size_that_does_not_divide_k_is_named():
    with pytest.raises(ValueError, match="group_size must divide in_features"):
        QuantWeight(8, torch.zeros(2, 10, dtype=torch.int8), torch.ones(2, 3), None, 3)


def test_stacked_experts_each_apply_their_own_perm():
    w = torch.randn(3, 4, 32)
    qw = quantize_int4(w, group_size=8)
    perm = torch.stack([torch.randperm(32) for _ in range(3)])
    stacked = QuantWeight(4, qw.qweight, qw.scales, qw.zeros, 8, perm)
    for e in range(3):
        one = QuantWeight(4, qw.qweight[e], qw.scales[e], qw.zeros[e], 8, perm[e])
        assert torch.equal(dequantize(stacked)[e], dequantize(one))
