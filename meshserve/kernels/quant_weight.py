"""Weight-only quantized matrices: the one form every loader produces and every quantized kernel reads.

A ``QuantWeight`` holds W [..., N, K] (leading dims are experts) as integers plus per-group scales and zero
points, W = (q - z) * s, with K split into groups of ``group_size`` consecutive columns. GPTQ's act-order
(``desc_act``) assigns columns to groups out of order; the loader reorders K so each group is contiguous and
keeps the order in ``perm``: the layer then computes x[..., perm] @ W_perm.T, which is x @ W.T.

Layouts (why: the kernels read a row's K contiguously, one group's scale and zero at a time):
- 8 bits: ``qweight`` int8 [..., N, K]; ``zeros`` int8 [..., N, K // group_size] or None (symmetric: 0).
  An unsigned checkpoint (GPTQ stores q in 0..255, zero 128 when symmetric) is shifted by -128, q and z alike.
- 4 bits: ``qweight`` uint8 [..., N, K // 2], column 2j in the low nibble, 2j + 1 in the high one;
  ``zeros`` uint8 [..., N, K // group_size] in 0..15 (symmetric checkpoints store 8).
- ``scales`` float32 [..., N, K // group_size].

``dequantize`` and ``quant_linear_reference`` are the oracle every kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BITS = (8, 4)


@dataclass
class QuantWeight:
    bits: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    perm: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        k = self.in_features
        if self.group_size < 1 or k % self.group_size:
            raise ValueError(f"group_size must divide in_features ({k}), got {self.group_size}")
        groups = k // self.group_size
        if tuple(self.scales.shape) != (*self.qweight.shape[:-1], groups):
            raise ValueError(f"scales must be [..., N, {groups}], got {tuple(self.scales.shape)}")
        if self.zeros is not None and self.zeros.shape != self.scales.shape:
            raise ValueError(
                f"zeros must match scales {tuple(self.scales.shape)}, got {tuple(self.zeros.shape)}"
            )
        if self.perm is not None and self.perm.shape[-1] != k:
            raise ValueError(f"perm must have in_features ({k}) entries, got {self.perm.shape[-1]}")

    @property
    def in_features(self) -> int:
        return self.qweight.shape[-1] * (2 if self.bits == 4 else 1)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[-2]

    @property
    def nbytes(self) -> int:
        """Resident bytes: the packed integers, scales, zeros and permutation."""
        parts = (self.qweight, self.scales, self.zeros, self.perm)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> uint8 [..., K] (low nibble first)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K] in 0..15 -> [..., K // 2] (column 2j in the low nibble)."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def dequantize(w: QuantWeight, original_order: bool = True) -> torch.Tensor:
    """W as float32 [..., N, K]: in the checkpoint's column order, or in the kernel's (``perm``) order."""
    q = unpack_int4(w.qweight) if w.bits == 4 else w.qweight
    default_zero = 8 if w.bits == 4 else 0
    zeros = w.zeros.float() if w.zeros is not None else torch.full_like(w.scales, default_zero)
    per_col = lambda t: t.repeat_interleave(w.group_size, dim=-1)  # noqa: E731
    dense = (q.float() - per_col(zeros)) * per_col(w.scales.float())
    if w.perm is None or not original_order:
        return dense
    out = torch.empty_like(dense)
    # W[..., perm[j]] = W_perm[..., j]; perm is [..., K] (one per expert), the same for every output row
    out.scatter_(-1, w.perm.unsqueeze(-2).expand_as(dense), dense)
    return out


def quant_linear_reference(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: x @ dequantize(W).T (+ bias) in float32, returned in x's dtype."""
    y = F.linear(x.float(), dequantize(w), None if bias is None else bias.float())
    return y.to(x.dtype)


def quantize_int8(weight: torch.Tensor) -> QuantWeight:
    """Per-output-channel symmetric int8 (what ``quantization="int8"`` makes at load)."""
    w = weight.float()
    scales = (w.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales).clamp(-127, 127).to(torch.int8)
    return QuantWeight(8, q, scales, None, w.shape[-1])


def quantize_int4(weight: torch.Tensor, group_size: int = 128) -> QuantWeight:
    """Group-wise asymmetric int4 (what ``quantization="int4"`` makes at load); group_size divides K."""
    w = weight.float()
    group_size = min(group_size, w.shape[-1])
    groups = w.unflatten(-1, (w.shape[-1] // group_size, group_size))
    lo, hi = groups.amin(dim=-1).clamp(max=0), groups.amax(dim=-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.round(groups / scales[..., None] + zeros[..., None]).clamp(0, 15).flatten(-2)
    return QuantWeight(4, pack_int4(q), scales, zeros.to(torch.uint8), group_size)
