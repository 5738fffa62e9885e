"""Packing integers into int32 words, checked against words worked out by hand from each format's docs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from meshserve.models.quant.awq import ORDER
from meshserve.models.quant.packing import pack_int32, unpack_int32


def test_gptq_packs_k_low_nibble_first():
    # Rows k = 0..7 of one column hold 0..7: row k in bits 4k..4k+3 of the column's word.
    values = torch.arange(8).view(8, 1)
    word = pack_int32(values, 4, dim=0)
    assert word.shape == (1, 1) and word.item() == 0x76543210
    assert unpack_int32(word, 4, dim=0).flatten().tolist() == list(range(8))


def test_eight_bit_lanes_and_sign_bit():
    word = pack_int32(torch.tensor([[1], [2], [3], [0xF4]]), 8, dim=0)
    assert word.item() == 0xF4030201 - (1 << 32)  # the top lane sets the sign bit of the int32
    assert unpack_int32(word, 8, dim=0).flatten().tolist() == [1, 2, 3, 0xF4]


def test_awq_interleaves_columns():
    # AutoAWQ's order [0, 2, 4, 6, 1, 3, 5, 7]: lane i holds column ORDER[i], so columns 0..7 holding 0..7
    # give lanes 0, 2, 4, 6, 1, 3, 5, 7 from the low bits up.
    word = pack_int32(torch.arange(8).view(1, 8), 4, dim=1, order=ORDER)
    assert word.item() == 0x75316420
    assert unpack_int32(word, 4, dim=1, order=ORDER).flatten().tolist() == list(range(8))


@given(
    bits=st.sampled_from([4, 8]),
    words=st.integers(1, 4),
    cols=st.integers(1, 5),
    dim=st.sampled_from([0, 1]),
    interleaved=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip(bits, words, cols, dim, interleaved, seed):
    lanes = 32 // bits
    shape = (words * lanes, cols) if dim == 0 else (cols, words * lanes)
    values = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(seed))
    order = ORDER if interleaved and bits == 4 else None
    packed = pack_int32(values, bits, dim, order)
    assert packed.dtype == torch.int32 and packed.shape[dim] == words
    assert torch.equal(unpack_int32(packed, bits, dim, order).long(), values)


def test_refuses_values_out_of_range():
    with pytest.raises(ValueError, match="0..15"):
        pack_int32(torch.tensor([[16]] * 8), 4, dim=0)
