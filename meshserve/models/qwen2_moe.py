"""Qwen2-MoE: Qwen2 attention (q/k/v bias) with routed experts plus a sigmoid-gated shared expert."""

from __future__ import annotations

from typing import Any

from torch import nn

from meshserve.models.config import ModelConfig, flag, positive, read_moe, read_qwen_moe_layers
from meshserve.models.decoder import DecoderLM
from meshserve.models.layers.mlp import GatedMLP
from meshserve.models.layers.moe import SparseMoE


class Qwen2MoeForCausalLM(DecoderLM):
    """Qwen1.5-MoE / Qwen2-MoE. Layers in mlp_only_layers or off the decoder_sparse_step are dense."""

    @classmethod
    def configure(cls, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        cfg.qkv_bias = flag(hf, "qkv_bias", True)
        read_moe(cfg, hf, experts_key="num_experts", intermediate_key="moe_intermediate_size")
        read_qwen_moe_layers(cfg, hf)
        cfg.shared_expert_intermediate_size = positive(hf, "shared_expert_intermediate_size")
        cfg.norm_topk_prob = flag(hf, "norm_topk_prob", False)
        if "layer_types" not in hf:  # Qwen2-MoE's rule: even layers below max_window_layers slide
            last = positive(hf, "max_window_layers", 28)
            slides = [i % 2 == 0 and i < last for i in range(cfg.num_layers)]
            cfg.layer_windows = [w if s else None for s, w in zip(slides, cfg.layer_windows, strict=True)]

    def make_mlp(self, cfg: ModelConfig, layer: int) -> nn.Module:
        if layer not in cfg.moe_layers:
            return GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        return SparseMoE(
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.num_experts,
            cfg.top_k,
            renormalize=cfg.norm_topk_prob,
            weights_in_model_dtype=True,
            shared_intermediate_size=cfg.shared_expert_intermediate_size,
        )
