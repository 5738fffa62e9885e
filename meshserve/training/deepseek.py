"""DeepSeek-V3's layers for training: multi-head latent attention and the grouped, bias-corrected MoE.

The maths follows transformers' DeepseekV3 (q_lora_rank null): MLA with interleaved rope on the rope part,
the softmax scaled by qk_head_dim^-0.5; a sigmoid router whose expert choice adds e_score_correction_bias
and keeps the topk_group groups scored by their two best experts (noaux_tc), weights from the unbiased
scores, normalised, x routed_scaling_factor; one always-on shared expert. The bias is not trained by
gradients: `update_bias` applies DeepSeek-V3's aux-loss-free rule after each step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.models.layers.norm import RMSNorm


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rope on interleaved pairs (x0, x1), (x2, x3)...; output even-rotated then odd-rotated, as HF's."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class LatentAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        h, self.heads = cfg["hidden_size"], cfg["num_attention_heads"]
        self.nope, self.rope = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]
        self.latent, self.v_dim = cfg["kv_lora_rank"], cfg["v_head_dim"]
        self.q_proj = nn.Linear(h, self.heads * (self.nope + self.rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.latent + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.latent, cfg["rms_norm_eps"])
        self.kv_b_proj = nn.Linear(self.latent, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, -1).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        c, k_rot = self.kv_a_proj_with_mqa(x).split([self.latent, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c)).view(b, t, self.heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_rot = rope_interleaved(k_rot[:, None], cos, sin).expand(-1, self.heads, -1, -1)
        q = torch.cat((q_nope, rope_interleaved(q_rot, cos, sin)), dim=-1)
        k = torch.cat((k_nope, k_rot), dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale: (nope + rope)^-0.5
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class GroupedMoE(nn.Module):
    """DeepSeek-V3's MoE block (`mlp.gate`, `mlp.experts.<e>`, `mlp.shared_experts`), HF's names."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from meshserve.training.model import MLP

        super().__init__()
        h, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
        self.num_experts, self.top_k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
        self.n_group, self.topk_group = cfg["n_group"], cfg["topk_group"]
        self.scaling = cfg["routed_scaling_factor"]
        self.gate = nn.Module()
        self.gate.weight = nn.Parameter(torch.empty(self.num_experts, h))
        self.gate.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))
        self.experts = nn.ModuleList(MLP(h, inter) for _ in range(self.num_experts))
        self.shared_experts = MLP(h, inter * cfg["n_shared_experts"])
        self.load = torch.zeros(self.num_experts)  # routed pairs per expert in the last forward
        self.balance_loss = torch.zeros(())  # aux-loss-free: balance comes from the bias alone

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [n, top_k], chosen [n, top_k]) for rows x [n, hidden]; noaux_tc as transformers."""
        scores = F.linear(x.float(), self.gate.weight.float()).sigmoid()
        choice = scores + self.gate.e_score_correction_bias
        grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
        groups = grouped.topk(2, dim=-1)[0].sum(-1).topk(self.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, groups, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        chosen = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, chosen)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * self.scaling
        return weights.to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.route(x)
        counts = torch.bincount(chosen.flatten(), minlength=self.num_experts)
        self.load = counts.detach().float()
        out = self.shared_experts(x)
        order = chosen.flatten().argsort()
        rows, pair_weights, start = order // self.top_k, weights.flatten()[order], 0
        for e, n in enumerate(counts.tolist()):  # one GEMM per expert on its slice of sorted pairs
            if n:
                idx = rows[start : start + n]
                y = self.experts[e](x.index_select(0, idx)) * pair_weights[start : start + n, None]
                out = out.index_add(0, idx, y)
            start += n
        return out.view(shape)

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """DeepSeek-V3's aux-loss-free balancing: bias += rate * sign(mean load - load), after a step."""
        self.gate.e_score_correction_bias += rate * torch.sign(self.load.mean() - self.load)
