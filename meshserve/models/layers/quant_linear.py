"""QuantLinear: a linear layer whose weight is weight-only int8 / int4, in place of a SmoothLinear.

The weight is held once, in the native kernels' packed layout (kernels/quant_gemm.py's PackedQuant, made
from the loader's QuantWeight when the layer is filled): its integers, scales, zeros and act-order
permutation are the module's buffers, so they move with it. The dense weight never exists (``weight`` is
its shape and dtype only, on the meta device).
"""

from __future__ import annotations

import torch
from torch import nn

from meshserve.kernels.quant_gemm import PackedQuant, pack_quant, unpack_quant
from meshserve.kernels.quant_gemm import quant_linear as packed_linear
from meshserve.kernels.quant_weight import QuantWeight, quant_linear_reference

QUANT_PARTS = ("qweight", "scales", "zeros", "perm")
NATIVE_DTYPES = (torch.bfloat16, torch.float32)  # what the native op takes; others run the oracle


def quant_linear(x: torch.Tensor, w: PackedQuant, bias: torch.Tensor | None) -> torch.Tensor:
    """The one place a quantized GEMM is chosen: the native op (its own torch fallback where it is not
    built) for bfloat16 / float32 activations, the dequantizing oracle for others (float16)."""
    if x.dtype in NATIVE_DTYPES:
        return packed_linear(x, w, bias)
    return quant_linear_reference(x, unpack_quant(w), bias)


def empty_quant(
    lead: tuple[int, ...], n: int, k: int, bits: int, group: int, zeros: bool, perm: bool
) -> QuantWeight:
    """An unfilled QuantWeight of this shape on the current device (meta while a model is built)."""
    groups = k // group
    qweight = torch.empty(
        *lead, n, k // 2 if bits == 4 else k, dtype=torch.uint8 if bits == 4 else torch.int8
    )
    zero = torch.empty(*lead, n, groups, dtype=qweight.dtype) if zeros else None
    order = torch.empty(*lead, k, dtype=torch.long) if perm else None
    return QuantWeight(bits, qweight, torch.empty(*lead, n, groups), zero, group, order)


class PackedBuffers(nn.Module):
    """Holds PackedQuant weights as buffers named ``{prefix}_{part}`` (``qweight`` etc. for prefix "")."""

    def _hold(self, prefix: str, w: QuantWeight) -> None:
        self._hold_packed(prefix, pack_quant(w))

    def _hold_packed(self, prefix: str, p: PackedQuant) -> None:
        setattr(self, f"_{prefix}form", (p.bits, p.out_features, p.in_features, p.group_size))
        for name in QUANT_PARTS:
            self.register_buffer(f"{prefix}{name}", getattr(p, name))

    def _packed(self, prefix: str) -> PackedQuant:
        parts = (getattr(self, f"{prefix}{name}") for name in QUANT_PARTS)
        return PackedQuant(*getattr(self, f"_{prefix}form"), *parts)


class QuantLinear(PackedBuffers):
    """y = x @ W.T + b with W held packed; the output is in the model's dtype."""

    def __init__(self, w: QuantWeight, bias: nn.Parameter | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = w.in_features, w.out_features
        self.dtype = dtype
        self.bias = bias
        self.set_weight(w)

    def set_weight(self, w: QuantWeight) -> None:
        """Hold `w` packed for the kernels (replacing what was held), checked against this layer's shape."""
        if (w.out_features, w.in_features) != (self.out_features, self.in_features):
            raise ValueError(
                f"quantized weight [{w.out_features}, {w.in_features}] for a "
                f"[{self.out_features}, {self.in_features}] layer"
            )
        self.bits, self.group_size = w.bits, w.group_size
        self._hold("", w)

    def packed(self) -> PackedQuant:
        return self._packed("")

    def quant_weight(self) -> QuantWeight:
        """The weight as a QuantWeight (unpacked: for tests and inspection, not the forward)."""
        return unpack_quant(self.packed())

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight's shape and dtype (no data: a meta tensor), for code that asks for them."""
        return torch.empty(self.out_features, self.in_features, dtype=self.dtype, device="meta")

    @property
    def nbytes(self) -> int:
        return self.packed().nbytes

    def wants_f32(self, m: int) -> bool:
        """The quantized GEMM takes the model dtype: a float32 input would only be cast back."""
        return False

    def forward(self, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        return quant_linear(x.to(self.dtype), self.packed(), self.bias)
