"""compressed-tensors' pack-quantized layout read into QuantWeight: the format's own worked example, a
hand-made asymmetric layer, then the writer's round trip."""

from __future__ import annotations

import pytest
import torch

from meshserve.kernels.quant_weight import dequantize
from meshserve.models.quant.compressed import quantize_compressed, read_compressed
from meshserve.models.quant.packing import pack_int32


def test_the_formats_worked_example():
    # pack_to_int32's docstring: 8-bit [1, 2] -> unsigned [129, 130], padded with 0 -> 33409.
    assert pack_int32(torch.tensor([[129, 130, 0, 0]]), 8, dim=1).item() == 33409


def test_asymmetric_four_bit_layer():
    # N = 8, K = 8, one group: signed q and zero points, stored with 8 added; zero points packed along N.
    q = torch.arange(-4, 4).repeat(8, 1)  # [N, K]
    z = torch.arange(-2, 6).view(8, 1)  # [N, groups]
    s = torch.linspace(0.5, 2.0, 8).view(8, 1)
    tensors = {
        "weight_packed": pack_int32(q + 8, 4, dim=1),
        "weight_zero_point": pack_int32(z + 8, 4, dim=0),
        "weight_scale": s.bfloat16(),
        "weight_shape": torch.tensor([8, 8]),
    }
    w = read_compressed(tensors, bits=4, group_size=8)
    assert torch.equal(dequantize(w), ((q - z) * s.bfloat16().float()).float())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_writer_round_trip(bits, sym, group_size):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits)) * 0.1
    tensors, values = quantize_compressed(w, bits, group_size, sym)
    q = read_compressed(tensors, bits, group_size)
    assert torch.allclose(dequantize(q), values, atol=1e-6) and (q.zeros is None) == sym
