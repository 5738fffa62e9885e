"""OLMoE: RMSNorm over all heads' q and over all k (before the head split), optional q/k/v clipping, and a
softmax top-k MoE without a shared expert in every layer."""

from __future__ import annotations

from typing import Any

from torch import nn

from meshserve.models.config import ModelConfig, flag, optional_real, read_moe
from meshserve.models.decoder import DecoderLM
from meshserve.models.layers.moe import SparseMoE


class OlmoeForCausalLM(DecoderLM):
    """OLMoE-1B-7B; checkpoints name the MoE like Qwen's (mlp.gate, mlp.experts.N.gate_proj ...)."""

    config_aliases = {"num_local_experts": "num_experts"}  # transformers' attribute_map

    @classmethod
    def configure(cls, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        cfg.qkv_bias = cfg.o_bias = flag(hf, "attention_bias", False)
        cfg.qk_norm, cfg.qk_norm_per_head = True, False
        cfg.clip_qkv = optional_real(hf, "clip_qkv")
        read_moe(cfg, hf, experts_key="num_experts", intermediate_key="intermediate_size")
        cfg.moe_layers = list(range(cfg.num_layers))
        cfg.num_moe_layers = cfg.num_layers
        cfg.norm_topk_prob = flag(hf, "norm_topk_prob", False)

    def make_mlp(self, cfg: ModelConfig, layer: int) -> nn.Module:
        return SparseMoE(
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.num_experts,
            cfg.top_k,
            renormalize=cfg.norm_topk_prob,
            weights_in_model_dtype=True,
        )
