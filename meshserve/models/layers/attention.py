"""Self-attention block: fused qkv projection, optional per-head q/k norm, rotary, paged attention, o_proj."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meshserve.kernels.attention import StepPlan, attend
from meshserve.kernels.fused import rotary_qkv, rotary_reference
from meshserve.kernels.smooth_gemm import SmoothLinear
from meshserve.models.batch import BatchMetadata
from meshserve.models.config import ModelConfig
from meshserve.models.layers.norm import RMSNorm


@dataclass
class StepInputs:
    """What every layer of one forward shares: rotary cos/sin [T, rotary_dim] and one attention plan per
    sliding window (None: full attention); `local`: the sliding layers' own cos/sin (Gemma 3), if any;
    `meta`: the batch itself (MLA's expanded prefill reads each sequence's rows by its block table)."""

    cos: torch.Tensor
    sin: torch.Tensor
    plans: dict[int | None, StepPlan]
    local: tuple[torch.Tensor, torch.Tensor] | None = None
    meta: BatchMetadata | None = None


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
        # Qwen3 and Gemma 3 normalise each head's q and k before rotary; OLMoE all heads' q (and k) at once.
        per_head = cfg.qk_norm_per_head
        q_norm, k_norm = (cfg.head_dim, cfg.head_dim) if per_head else (q_size, kv_size)
        self.q_norm = RMSNorm(q_norm, cfg.rms_norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_norm, cfg.rms_norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.norm_per_head = per_head
        self.clip = cfg.clip_qkv
        self.rotary_dim = int(cfg.head_dim * cfg.partial_rotary_factor)
        self.local_rope = window is not None and cfg.local_rope_theta is not None
        self.scale = cfg.head_dim**-0.5 if cfg.attention_scale is None else cfg.attention_scale
        self.softcap = cfg.attn_logit_softcap
        # The fused rotary op rotates whole heads of an unnormalised, unclipped qkv row.
        self.fused_rotary = not cfg.qk_norm and self.clip is None and self.rotary_dim == cfg.head_dim

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, step: StepInputs) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x, out_f32=True)  # float32 only from a float32 GEMM; rotary rounds it
        cos, sin = step.local if self.local_rope else (step.cos, step.sin)
        if self.fused_rotary:
            q, k, v = rotary_qkv(qkv, cos, sin, self.num_heads, self.num_kv_heads, self.head_dim)
        else:
            q, k, v = self._qkv(qkv.to(cos.dtype), cos, sin)
        out = attend(q, k, v, kv_cache, step.plans[self.window], self.scale, self.softcap)
        return self.o_proj(out.reshape(t, -1), out_f32=True)  # the residual add rounds it

    def _qkv(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v with the family's q/k norm, clipping and (partial) rotary, in transformers' order."""
        t = qkv.shape[0]
        q, k, v = qkv.split(self.split, dim=-1)
        if self.q_norm is not None and not self.norm_per_head:  # OLMoE: before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (y.clamp(-self.clip, self.clip) for y in (q, k, v))
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v.reshape(t, self.num_kv_heads, -1)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == self.head_dim:
            return rotary_reference(x, cos, sin)
        d = self.rotary_dim  # Phi-4-mini: the rest of each head passes through
        return torch.cat((rotary_reference(x[..., :d], cos, sin), x[..., d:]), dim=-1)
