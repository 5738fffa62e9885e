"""RMSNorm, computed in float32 like Hugging Face so both sides round the same way (kernels/fused.py)."""

from __future__ import annotations

import torch
from torch import nn

from meshserve.kernels.fused import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learned scale."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, out_f32)

    def add_forward(
        self, x: torch.Tensor, delta: torch.Tensor, out_f32: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)) in one pass; x may be updated in place. out_f32: the norm in float32
        (holding model-dtype values) for a float32 GEMM, when the native op runs."""
        return add_rms_norm(x, delta, self.weight, self.eps, out_f32)
