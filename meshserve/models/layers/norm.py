"""RMSNorm, computed in float32 like Hugging Face so both sides round the same way (kernels/fused.py)."""

from __future__ import annotations

import torch
from torch import nn

from meshserve.kernels.fused import add_rms_norm, rms_norm


def offset_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """Gemma's norm: (x / rms(x)) * (offset + weight) all in float32, rounded once at the end (Llama's
    rounds before the scale)."""
    x32 = x.float()
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.float())
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learned scale (offset + weight; offset 0 but
    for Gemma, whose checkpoints store the scale minus one)."""

    def __init__(self, size: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        if self.offset:
            out = offset_rms_norm(x, self.weight, self.eps, self.offset)
            return out.float() if out_f32 else out
        return rms_norm(x, self.weight, self.eps, out_f32)

    def add_forward(
        self, x: torch.Tensor, delta: torch.Tensor, out_f32: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)) in one pass; x may be updated in place. out_f32: the norm in float32
        (holding model-dtype values) for a float32 GEMM, when the native op runs."""
        if self.offset:
            x = x + delta.to(x.dtype)
            return x, self(x, out_f32)
        return add_rms_norm(x, delta, self.weight, self.eps, out_f32)
