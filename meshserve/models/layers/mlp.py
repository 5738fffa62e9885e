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

    def forward(self, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        """x: [T, hidden] in the model dtype, or float32 holding its values (for a float32 GEMM). Float32
        GEMM results stay float32 into the next fused op (which rounds them), and out of this block when
        out_f32 (the residual add rounds them)."""
        gate_up = self.gate_up_proj(x, out_f32=True)
        act = silu_mul(gate_up, self.down_proj.weight.dtype, self.down_proj.wants_f32(x.shape[0]))
        return self.down_proj(act, out_f32=out_f32)
