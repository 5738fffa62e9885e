"""AWQ's GEMM layout read into QuantWeight: a hand-made layer, then the writer's round trip."""

from __future__ import annotations

import torch

from meshserve.kernels.quant_weight import dequantize
from meshserve.models.quant.awq import ORDER, quantize_awq, read_awq
from meshserve.models.quant.packing import pack_int32


def test_interleaved_columns_and_zeros():
    # K = 4, N = 8, one group: qweight word k holds row k's eight columns in lanes ORDER.
    q = torch.arange(32).view(4, 8) % 16
    z = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    s = torch.tensor([[0.5, 1, 2, 0.25, 0.5, 1, 2, 4]])
    layer = {
        "qweight": pack_int32(q, 4, dim=1, order=ORDER),
        "qzeros": pack_int32(z, 4, dim=1, order=ORDER),
        "scales": s.half(),
    }
    assert layer["qweight"][0, 0].item() == 0x75316420  # row 0: columns 0..7 hold 0..7
    w = read_awq(layer, group_size=-1)
    assert torch.equal(dequantize(w), ((q - z) * s).T.float())


def test_writer_round_trip():
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    tensors, values = quantize_awq(w, 32)
    assert tensors["qweight"].shape == (64, 3) and tensors["qzeros"].shape == (2, 3)
    assert torch.allclose(dequantize(read_awq(tensors, 32)), values, atol=1e-6)
    assert (values - w).abs().max() <= (w.max() - w.min()) / 15
