"""GPTQ's checkpoint layout (AutoGPTQ / GPTQModel, as transformers saves it) <-> QuantWeight.

Per linear layer y = x @ W.T with W [N, K]:
- ``qweight`` int32 [K * bits / 32, N]: packed along K, input row k in word k // (32/bits), lane k % (32/bits)
  (low bits first);
- ``qzeros`` int32 [groups, N * bits / 32]: packed along N the same way; format v1 (``checkpoint_format:
  gptq``) stores z - 1 in bits-wide lanes, so a zero of 0 wraps to 2**bits - 1 and reads back as
  (stored + 1) mod 2**bits;
- ``scales`` float16 [groups, N]; ``g_idx`` int32 [K]: the group of each input row. Act-order (desc_act)
  quantized the rows in order of decreasing activation size, so g_idx is not sorted: a stable argsort of it
  is the ``perm`` that makes each group contiguous.
W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n].
"""

from __future__ import annotations

import torch

from meshserve.kernels.quant_weight import QuantWeight, pack_int4
from meshserve.models.quant.packing import pack_int32, unpack_int32

PARTS = ("qweight", "qzeros", "scales", "g_idx")  # the tensors of one layer, g_idx optional


def group_perm(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The act-order permutation of K that makes g_idx's groups contiguous (None when they already are);
    refused unless every group holds exactly group_size rows."""
    k = g_idx.numel()
    g_idx = g_idx.long()
    counts = torch.bincount(g_idx, minlength=k // group_size)
    if counts.numel() != k // group_size or bool((counts != group_size).any()):
        raise ValueError(f"g_idx must put exactly {group_size} rows in each of {k // group_size} groups")
    natural = torch.arange(k) // group_size
    return None if bool((g_idx == natural).all()) else torch.argsort(g_idx, stable=True)


def read_gptq(
    tensors: dict[str, torch.Tensor], bits: int, group_size: int, zero_offset: int = 1
) -> QuantWeight:
    """One layer's GPTQ tensors (PARTS; g_idx may be absent) as a QuantWeight ([N, K], groups contiguous)."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    q = unpack_int32(qweight, bits, dim=0)  # [K, N]
    k, n = q.shape
    group = k if group_size == -1 else group_size
    if k % group or scales.shape != (k // group, n):
        raise ValueError(
            f"scales must be [{k // max(group, 1)}, {n}] for group_size {group_size}, "
            f"got {tuple(scales.shape)}"
        )
    mask = (1 << bits) - 1
    z = (unpack_int32(qzeros, bits, dim=1)[:, :n] + zero_offset) & mask  # [groups, N]
    g_idx = tensors.get("g_idx")
    perm = None if g_idx is None else group_perm(g_idx, group)
    q = q.T if perm is None else q.T[:, perm]  # [N, K], each group contiguous
    z, s = z.T.contiguous(), scales.T.float().contiguous()
    symmetric = bool((z == 1 << (bits - 1)).all())  # the kernels' default zero: no tensor needed
    if bits == 8:  # int8 storage: q and z shifted by -128 together
        qw, zeros = (q - 128).to(torch.int8).contiguous(), (z - 128).to(torch.int8)
    else:
        qw, zeros = pack_int4(q).contiguous(), z.to(torch.uint8)
    return QuantWeight(bits, qw, s, None if symmetric else zeros, group, perm)


def quantize_gptq(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = True,
    perm: torch.Tensor | None = None,
    zero_offset: int = 1,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The GPTQ checkpoint tensors of a float W [N, K] (round-to-nearest, GPTQ's min/max grid; what GPTQ's
    error feedback would add changes the values, not the layout), and the float32 W they stand for,
    computed here from the integers before packing. ``perm``: act-order, the order of K in which groups
    are formed (group j holds rows perm[j*g:(j+1)*g]); ``group_size`` -1 is one group."""
    w = weight.float()
    n, k = w.shape
    group = k if group_size == -1 else group_size
    order = torch.arange(k) if perm is None else perm.long()
    grouped = w[:, order].unflatten(1, (k // group, group))  # [N, groups, group]
    maxq = (1 << bits) - 1
    lo, hi = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scales = ((hi - lo) / maxq).clamp_min(1e-8).half().float()  # stored as float16: quantize on that grid
    zeros = torch.full_like(scales, (maxq + 1) // 2) if sym else torch.round(-lo / scales).clamp(0, maxq)
    q = torch.clamp(torch.round(grouped / scales[..., None]) + zeros[..., None], 0, maxq).flatten(1)
    q_rows, dense = torch.empty_like(q), torch.empty_like(q)
    q_rows[:, order] = q  # back to the checkpoint's row order
    dense[:, order] = ((q.unflatten(1, grouped.shape[1:]) - zeros[..., None]) * scales[..., None]).flatten(1)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group).to(torch.int32)
    stored_zeros = (zeros.long() - zero_offset) & maxq  # v1: z - 1, wrapping as the packer did
    tensors = {
        "qweight": pack_int32(q_rows.T.long(), bits, dim=0),
        "qzeros": pack_int32(stored_zeros.T, bits, dim=1),
        "scales": scales.T.half().contiguous(),
        "g_idx": g_idx,
    }
    return tensors, dense
