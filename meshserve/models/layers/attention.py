"""Self-attention block: fused qkv projection, optional per-head q/k norm, rotary, paged attention, o_proj."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meshserve.kernels.attention import StepPlan, attend
from meshserve.kernels.fused import rotary_qkv, rotary_reference
from meshserve.kernels.smooth_gemm import SmoothLinear
from meshserve.models.config import ModelConfig
from meshserve.models.layers.norm import RMSNorm


@dataclass
class StepInputs:
    """What every layer of one forward shares: rotary cos/sin [T, head_dim] and one attention plan per
    sliding window (None: full attention)."""

    cos: torch.Tensor
    sin: torch.Tensor
    plans: dict[int | None, StepPlan]


class Attention(nn.Module):
    """GQA attention over the paged KV cache. `qkv_proj` holds [q; k; v] so one GEMM serves all three."""

    def __init__(self, cfg: ModelConfig, window: int | None = None) -> None:
        super().__init__()
        self.window = window  # sliding window of this layer (Mixtral, Qwen2); None: full causal attention
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = SmoothLinear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        self.o_proj = SmoothLinear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        # Qwen3 normalises each head's q and k before rotary.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, step: StepInputs) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x, out_f32=True)  # float32 only from a float32 GEMM; rotary rounds it
        if self.q_norm is None:
            q, k, v = rotary_qkv(qkv, step.cos, step.sin, self.num_heads, self.num_kv_heads, self.head_dim)
        else:  # Qwen3: per-head norm between the projection and rotary
            q, k, v = qkv.to(step.cos.dtype).split(self.split, dim=-1)
            q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim))
            q, k = rotary_reference(q, step.cos, step.sin), rotary_reference(k, step.cos, step.sin)
            v = v.view(t, self.num_kv_heads, self.head_dim)
        out = attend(q, k, v, kv_cache, step.plans[self.window], self.scale)
        return self.o_proj(out.reshape(t, -1), out_f32=True)  # the residual add rounds it
