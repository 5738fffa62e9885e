"""GPTQ's layout read into QuantWeight: small hand-made layers, then the writer's round trip."""

from __future__ import annotations

import pytest
import torch

from meshserve.kernels.quant_weight import dequantize, quant_linear_reference
from meshserve.models.quant.gptq import group_perm, quantize_gptq, read_gptq
from meshserve.models.quant.packing import pack_int32


def _layer(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, bits: int, zero_offset: int = 1) -> dict:
    """GPTQ tensors from q [K, N], z [groups, N] (true zeros) and s [groups, N], packed as the docs say."""
    mask = (1 << bits) - 1
    return {
        "qweight": pack_int32(q, bits, dim=0),
        "qzeros": pack_int32((z - zero_offset) & mask, bits, dim=1),
        "scales": s.half(),
    }


def test_four_bit_v1_zeros_and_groups():
    # K = 16 in two groups of 8, N = 8. W[n, k] = (q[k, n] - z[g, n]) * s[g, n].
    q = (torch.arange(16)[:, None] + torch.arange(8)) % 16
    z = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]])  # z = 0 wraps to 15 in v1
    s = torch.tensor([[0.5] * 8, [0.25] * 8])
    w = read_gptq(_layer(q, z, s, 4), bits=4, group_size=8)
    expected = ((q - z.repeat_interleave(8, 0)) * s.repeat_interleave(8, 0)).T.float()
    assert torch.equal(dequantize(w), expected)
    assert w.perm is None and w.zeros is not None


def test_v2_stores_zeros_as_they_are():
    q, z, s = torch.randint(0, 16, (8, 8)), torch.randint(0, 16, (1, 8)), torch.rand(1, 8)
    v1 = read_gptq(_layer(q, z, s, 4, zero_offset=1), 4, -1, zero_offset=1)
    v2 = read_gptq(_layer(q, z, s, 4, zero_offset=0), 4, -1, zero_offset=0)
    assert torch.equal(dequantize(v1), dequantize(v2))


def test_symmetric_eight_bit_keeps_no_zeros():
    # sym: every zero is 128 (v1 stores 127); int8 storage shifts q and z by -128 together.
    q = torch.randint(0, 256, (8, 4))
    s = torch.full((1, 4), 0.1)
    w = read_gptq(_layer(q, torch.full((1, 4), 128), s, 8), bits=8, group_size=-1)
    assert w.zeros is None and w.qweight.dtype == torch.int8
    assert torch.allclose(dequantize(w), ((q - 128) * s.half().float()).T.float())


def test_act_order_g_idx_becomes_a_permutation():
    # Act-order: rows are grouped by g_idx, not by position; groups hold 4 rows each.
    g_idx = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.int32)
    perm = group_perm(g_idx, 4)
    assert perm.tolist() == [1, 4, 5, 7, 0, 2, 3, 6]  # stable: each group's rows in checkpoint order
    q = torch.randint(0, 16, (8, 8))
    z, s = torch.randint(0, 16, (2, 8)), torch.rand(2, 8) + 0.1
    layer = _layer(q, z, s, 4) | {"g_idx": g_idx}
    w = read_gptq(layer, bits=4, group_size=4)
    expected = ((q - z[g_idx.long()]) * s.half().float()[g_idx.long()]).T
    assert torch.allclose(dequantize(w), expected)
    x = torch.randn(3, 8)
    assert torch.allclose(quant_linear_reference(x, w), x @ expected.T, atol=1e-5)


def test_g_idx_must_fill_groups_evenly():
    with pytest.raises(ValueError, match="exactly 4 rows"):
        group_perm(torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]), 4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_writer_round_trip(bits, sym, group_size, act_order):
    gen = torch.Generator().manual_seed(bits + 2 * sym + group_size)
    w = torch.randn(16, 64, generator=gen) * 0.1
    perm = torch.randperm(64, generator=gen) if act_order else None
    tensors, values = quantize_gptq(w, bits, group_size, sym, perm)
    q = read_gptq(tensors, bits, group_size)
    assert torch.allclose(dequantize(q), values, atol=1e-6)
    step = (w.abs().max() * 2 / ((1 << bits) - 1)).item()
    assert (values - w).abs().max() <= step  # the writer's grid: within one step of the float weight
    assert (q.perm is not None) == (act_order and group_size != -1)
