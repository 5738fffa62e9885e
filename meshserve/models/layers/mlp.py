"""Gated MLP (gate/up/down) with gate and up fused into one matmul: SiLU, or Gemma's tanh GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.kernels.fused import silu_mul
from meshserve.kernels.smooth_gemm import SmoothLinear


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); `gate_up_proj` holds [gate; up] stacked so one GEMM serves both."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_up_proj = SmoothLinear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = SmoothLinear(intermediate_size, hidden_size, bias=False)
        self.act = act

    def forward(self, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        """x: [T, hidden] in the model dtype, or float32 holding its values (for a float32 GEMM). Float32
        GEMM results stay float32 into the next fused op (which rounds them), and out of this block when
        out_f32 (the residual add rounds them)."""
        gate_up = self.gate_up_proj(x, out_f32=True)
        dtype = self.down_proj.weight.dtype
        if self.act == "silu":
            act = silu_mul(gate_up, dtype, self.down_proj.wants_f32(x.shape[0]))
        else:  # gelu_pytorch_tanh, in the model dtype as transformers runs it
            gate, up = gate_up.to(dtype).chunk(2, dim=-1)
            act = F.gelu(gate, approximate="tanh") * up
        return self.down_proj(act, out_f32=out_f32)
