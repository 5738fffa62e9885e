"""Qwen3-MoE: per-head RMSNorm on q and k, no q/k/v bias, routed experts without a shared expert."""

from __future__ import annotations

from typing import Any

from meshserve.models.config import ModelConfig, flag, read_moe, read_qwen_moe_layers
from meshserve.models.qwen2_moe import Qwen2MoeForCausalLM


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Qwen3-30B-A3B-style MoE (same layer selection rule as Qwen2-MoE)."""

    config_aliases = {"num_experts": "num_local_experts"}  # transformers' attribute_map

    @classmethod
    def configure(cls, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        cfg.qkv_bias = cfg.o_bias = flag(hf, "attention_bias", False)
        cfg.qk_norm = True
        read_moe(cfg, hf, experts_key="num_experts", intermediate_key="moe_intermediate_size")
        read_qwen_moe_layers(cfg, hf)
        cfg.shared_expert_intermediate_size = 0
        cfg.norm_topk_prob = flag(hf, "norm_topk_prob", False)
