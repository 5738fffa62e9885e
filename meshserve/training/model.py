"""A training-time decoder (Llama, Mixtral with its sparse MoE, or DeepSeek-V3 with MLA and grouped routing:
training/deepseek.py) whose state_dict uses Hugging Face names.

Plain full-sequence forward with causal SDPA; no KV cache. The maths follows transformers' Llama,
Mixtral and DeepseekV3 exactly (RMSNorm in float32, rotate-half RoPE, softmax router in float32, top-k
renormalised), so the saved weights give the same greedy output in transformers and in meshserve.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.models.layers.norm import RMSNorm  # the serving layer: the same float32 maths
from meshserve.training.deepseek import GroupedMoE, LatentAttention


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        h, self.heads, self.kv_heads = (
            cfg["hidden_size"],
            cfg["num_attention_heads"],
            cfg["num_key_value_heads"],
        )
        self.head_dim = h // self.heads
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(
        self, hidden: int, inter: int, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    ):
        super().__init__()
        self.names = names
        for name, shape in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden)), strict=True):
            self.add_module(name, nn.Linear(*shape, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))


class SparseMoE(nn.Module):
    """Mixtral's block_sparse_moe; keeps the last forward's router statistics for the balance loss."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        h, self.num_experts, self.top_k = (
            cfg["hidden_size"],
            cfg["num_local_experts"],
            cfg["num_experts_per_tok"],
        )
        self.gate = nn.Linear(h, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(h, cfg["intermediate_size"], ("w1", "w3", "w2")) for _ in range(self.num_experts)
        )
        self.balance_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        # Switch-style balance loss: experts x sum(fraction of routed pairs x mean router probability).
        routed = torch.bincount(chosen.flatten(), minlength=self.num_experts).float() / chosen.numel()
        self.balance_loss = self.num_experts * (routed * probs.mean(0)).sum()
        out = torch.zeros_like(x)
        order = chosen.flatten().argsort()
        counts = routed.mul(chosen.numel()).long().tolist()
        rows = order // self.top_k
        pair_weights = weights.flatten()[order]
        start = 0
        for e, n in enumerate(counts):  # one GEMM per expert on its contiguous slice of sorted pairs
            if n:  # index_select, not x[idx]: its backward is index_add_, ~10x faster on CPU than index_put_
                idx = rows[start : start + n]
                out.index_add_(
                    0, idx, self.experts[e](x.index_select(0, idx)) * pair_weights[start : start + n, None]
                )
            start += n
        return out.view(shape)


class Layer(nn.Module):
    def __init__(self, cfg: dict[str, Any], index: int) -> None:
        super().__init__()
        deepseek = cfg["arch"] == "deepseek_v3"
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.self_attn = LatentAttention(cfg) if deepseek else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        if cfg["arch"] == "mixtral":
            self.block_sparse_moe = SparseMoE(cfg)
        elif deepseek and index >= cfg["first_k_dense_replace"]:
            self.mlp = GroupedMoE(cfg)
        else:
            self.mlp = MLP(cfg["hidden_size"], cfg["intermediate_size"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return x + ffn(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class TinyCausalLM(nn.Module):
    """`model.*` + `lm_head` (tied to the embedding when the config says so), as transformers names them."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        if not self.tied:
            self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        head_dim = cfg.get("qk_rope_head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        inv_freq = 1.0 / cfg["rope_theta"] ** (
            torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, GroupedMoE):
            nn.init.normal_(module.gate.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, tokens, vocab] for ids [batch, tokens] (positions 0..tokens-1)."""
        freqs = torch.arange(ids.shape[1], dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.tied else self.lm_head.weight
        return x @ head.t()

    def balance_loss(self) -> torch.Tensor:
        losses = [m.balance_loss for m in self.modules() if isinstance(m, SparseMoE)]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def update_router_bias(self, rate: float) -> None:
        """Aux-loss-free balancing step of every grouped MoE layer (none in Llama / Mixtral)."""
        for m in self.modules():
            if isinstance(m, GroupedMoE):
                m.update_bias(rate)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
