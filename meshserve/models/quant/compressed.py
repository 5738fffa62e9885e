"""compressed-tensors' ``pack-quantized`` layout (llm-compressor's W4A16 / W8A16) <-> QuantWeight.

Per linear layer y = x @ W.T with W [N, K], integers q in [-2**(b-1), 2**(b-1)) stored with 2**(b-1) added:
- ``weight_packed`` int32 [N, K * bits / 32]: packed along K, column 32/bits*j + i in lane i of word j
  (low bits first);
- ``weight_scale`` [N, groups] (groups = 1 for the channel strategy); ``weight_shape`` int [2] = [N, K];
- ``weight_zero_point`` int32 [N * bits / 32, groups] (asymmetric only): packed along N the same way, with
  the same offset; ``weight_g_idx`` [K] (act-order), as GPTQ's g_idx.
W[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)]; the offsets cancel, so the stored (unsigned) integers are
QuantWeight's 4-bit values as they are, and 8-bit ones shifted by -128.
"""

from __future__ import annotations

import torch

from meshserve.kernels.quant_weight import QuantWeight, pack_int4
from meshserve.models.quant.gptq import group_perm
from meshserve.models.quant.packing import pack_int32, unpack_int32

PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
OPTIONAL = ("weight_zero_point", "weight_g_idx")


def read_compressed(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> QuantWeight:
    """One layer's pack-quantized tensors (PARTS; zero point and g_idx may be absent) as a QuantWeight."""
    n, k = (int(v) for v in tensors["weight_shape"].tolist())
    q = unpack_int32(tensors["weight_packed"], bits, dim=1)[:, :k]  # [N, K], unsigned
    scales = tensors["weight_scale"].float()
    group = k // scales.shape[1] if group_size == -1 else group_size
    if q.shape[0] != n or k % group or scales.shape != (n, k // group):
        raise ValueError(f"weight_scale must be [{n}, {k // max(group, 1)}] for weight_shape [{n}, {k}]")
    zp = tensors.get("weight_zero_point")
    z = None if zp is None else unpack_int32(zp, bits, dim=0)[:n]
    g_idx = tensors.get("weight_g_idx")
    perm = None if g_idx is None else group_perm(g_idx, group)
    if perm is not None:
        q = q[:, perm]
    if z is not None and bool((z == 1 << (bits - 1)).all()):
        z = None  # the kernels' default zero
    if bits == 8:
        qw = (q - 128).to(torch.int8).contiguous()
        zeros = None if z is None else (z - 128).to(torch.int8).contiguous()
    else:
        qw = pack_int4(q).contiguous()
        zeros = None if z is None else z.to(torch.uint8).contiguous()
    return QuantWeight(bits, qw, scales.contiguous(), zeros, group, perm)


def quantize_compressed(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool = True
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The pack-quantized tensors of a float W [N, K] (round-to-nearest; scales stored as bfloat16), and
    the float32 W they stand for, computed from the integers before packing; group_size -1 is one group
    per row (the channel strategy)."""
    w = weight.float()
    n, k = w.shape
    group = k if group_size == -1 else group_size
    grouped = w.unflatten(1, (k // group, group))
    half = 1 << (bits - 1)
    lo, hi = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    if sym:
        scales = (torch.maximum(-lo, hi) / (half - 0.5)).clamp_min(1e-8).bfloat16().float()
        zeros = torch.zeros_like(scales)
    else:
        scales = ((hi - lo) / (2 * half - 1)).clamp_min(1e-8).bfloat16().float()
        zeros = torch.clamp(torch.round(-lo / scales) - half, -half, half - 1)
    q = torch.clamp(torch.round(grouped / scales[..., None]) + zeros[..., None], -half, half - 1)
    dense = ((q - zeros[..., None]) * scales[..., None]).flatten(1)
    tensors = {
        "weight_packed": pack_int32(q.flatten(1).long() + half, bits, dim=1),
        "weight_scale": scales.bfloat16(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not sym:
        tensors["weight_zero_point"] = pack_int32(zeros.long() + half, bits, dim=0)
    return tensors, dense
