"""AWQ's GEMM checkpoint layout (AutoAWQ, as transformers saves it) <-> QuantWeight.

Per linear layer y = x @ W.T with W [N, K], 4 bits, groups of ``group_size`` rows of K:
- ``qweight`` int32 [K, N / 8]: packed along N, eight columns a word, interleaved: lane i (bits 4i..4i+3)
  holds column ORDER[i] of the word's eight;
- ``qzeros`` int32 [groups, N / 8]: the zero points, packed the same way (stored as they are);
- ``scales`` float16 [groups, N].
W[n, k] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n].
"""

from __future__ import annotations

import torch

from meshserve.kernels.quant_weight import QuantWeight, pack_int4
from meshserve.models.quant.packing import pack_int32, unpack_int32

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's pack order: lane i holds column ORDER[i]
PARTS = ("qweight", "qzeros", "scales")


def read_awq(tensors: dict[str, torch.Tensor], group_size: int) -> QuantWeight:
    """One layer's AWQ tensors (PARTS) as a QuantWeight [N, K]."""
    q = unpack_int32(tensors["qweight"], 4, dim=1, order=ORDER)  # [K, N]
    z = unpack_int32(tensors["qzeros"], 4, dim=1, order=ORDER)  # [groups, N]
    k, n = q.shape
    group = k if group_size == -1 else group_size
    scales = tensors["scales"]
    if k % group or scales.shape != (k // group, n) or z.shape != scales.shape:
        raise ValueError(f"scales and qzeros must be [{k // max(group, 1)}, {n}] for group_size {group_size}")
    s = scales.T.float().contiguous()
    return QuantWeight(4, pack_int4(q.T).contiguous(), s, z.T.to(torch.uint8).contiguous(), group)


def quantize_awq(weight: torch.Tensor, group_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The AWQ checkpoint tensors of a float W [N, K] (round-to-nearest on AWQ's asymmetric min/max grid;
    AWQ's activation-aware scaling changes the values, not the layout), and the float32 W they stand for,
    computed here from the integers before packing."""
    w = weight.float()
    n, k = w.shape
    group = k if group_size == -1 else group_size
    grouped = w.unflatten(1, (k // group, group))  # [N, groups, group]
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    scales = ((hi - lo).clamp_min(1e-5) / 15).half().float()  # stored as float16: quantize on that grid
    zeros = torch.clamp(-torch.round(lo / scales), 0, 15)
    q = torch.clamp(torch.round(grouped / scales[..., None]) + zeros[..., None], 0, 15).flatten(1)
    dense = ((q.unflatten(1, grouped.shape[1:]) - zeros[..., None]) * scales[..., None]).flatten(1)
    tensors = {
        "qweight": pack_int32(q.T.long(), 4, dim=1, order=ORDER),
        "qzeros": pack_int32(zeros.T.long(), 4, dim=1, order=ORDER),
        "scales": scales.T.half().contiguous(),
    }
    return tensors, dense
