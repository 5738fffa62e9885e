"""SiLU-gated MLP (gate/up/down) with gate and up fused into one matmul."""

from __future__ import annotations

import torch
from torch import nn

from meshserve.kernels.fused import silu_mul
from meshserve.kernels.smooth_gemm import SmoothLinear


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); `gate_up_proj` holds [gate; up] stacked so one GEMM serves both."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = SmoothLinear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = SmoothLinear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))
