"""QuantLinear: a linear layer whose weight is a QuantWeight (weight-only int8 / int4), in place of a
SmoothLinear. The packed integers, scales, zeros and act-order permutation are its buffers, so they move
with the module; the dense weight never exists (``weight`` is its shape and dtype only, on the meta device).
"""

from __future__ import annotations

import torch
from torch import nn

from meshserve.kernels.quant_weight import QuantWeight, quant_linear_reference

QUANT_PARTS = ("qweight", "scales", "zeros", "perm")


def quant_linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The one place a quantized GEMM is chosen (the torch oracle until the native op is merged)."""
    return quant_linear_reference(x, w, bias)


def empty_quant(
    lead: tuple[int, ...], n: int, k: int, bits: int, group: int, zeros: bool, perm: bool
) -> QuantWeight:
    """An unfilled QuantWeight of this shape on the current device (meta while a model is built)."""
    groups = k // group
    qweight = torch.empty(
        *lead, n, k // 2 if bits == 4 else k, dtype=torch.uint8 if bits == 4 else torch.int8
    )
    zero = torch.empty(*lead, n, groups, dtype=qweight.dtype) if zeros else None
    order = torch.empty(k, dtype=torch.long) if perm else None
    return QuantWeight(bits, qweight, torch.empty(*lead, n, groups), zero, group, order)


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W held as a QuantWeight; the output is in the model's dtype."""

    def __init__(self, w: QuantWeight, bias: nn.Parameter | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = w.in_features, w.out_features
        self.dtype = dtype
        self.bias = bias
        self.set_weight(w)

    def set_weight(self, w: QuantWeight) -> None:
        """Hold `w` (replacing what was held), checked against this layer's shape."""
        if (w.out_features, w.in_features) != (self.out_features, self.in_features):
            raise ValueError(
                f"quantized weight [{w.out_features}, {w.in_features}] for a "
                f"[{self.out_features}, {self.in_features}] layer"
            )
        self.bits, self.group_size = w.bits, w.group_size
        for name in QUANT_PARTS:
            self.register_buffer(name, getattr(w, name))

    def quant_weight(self) -> QuantWeight:
        return QuantWeight(self.bits, self.qweight, self.scales, self.zeros, self.group_size, self.perm)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight's shape and dtype (no data: a meta tensor), for code that asks for them."""
        return torch.empty(self.out_features, self.in_features, dtype=self.dtype, device="meta")

    @property
    def nbytes(self) -> int:
        return self.quant_weight().nbytes

    def wants_f32(self, m: int) -> bool:
        """The quantized GEMM takes the model dtype: a float32 input would only be cast back."""
        return False

    def forward(self, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        return quant_linear(x.to(self.dtype), self.quant_weight(), self.bias)
