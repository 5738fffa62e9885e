"""GraniteMoE: Mixtral's layout with IBM's four multipliers (embeddings, residual branches, attention
scores, logits) and experts stored stacked (input_linear = [gate; up], output_linear) with a router."""

from __future__ import annotations

from typing import Any

from torch import nn

from meshserve.models.config import ModelConfig, flag, positive_real, read_moe
from meshserve.models.decoder import DecoderLM
from meshserve.models.layers.moe import SparseMoE


class GraniteMoeForCausalLM(DecoderLM):
    """granite-3.0-1b-a400m / 3b-a800m. Routing is softmax over the top-k logits, the same weights as
    softmax, top-k and renormalisation."""

    # Classic checkpoint names first, then what transformers 5 saves.
    checkpoint_aliases = (
        (".mlp.experts.gate_up_proj", ".block_sparse_moe.input_linear.weight"),
        (".mlp.experts.down_proj", ".block_sparse_moe.output_linear.weight"),
        (".mlp.gate.weight", ".block_sparse_moe.router.layer.weight"),
        (".mlp.gate.weight", ".block_sparse_moe.router.weight"),
        (".mlp.", ".block_sparse_moe."),
    )

    @classmethod
    def configure(cls, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        cfg.qkv_bias = cfg.o_bias = flag(hf, "attention_bias", False)
        cfg.embedding_scale = positive_real(hf, "embedding_multiplier", 1.0)
        cfg.residual_scale = positive_real(hf, "residual_multiplier", 1.0)
        cfg.attention_scale = positive_real(hf, "attention_multiplier", 1.0)
        cfg.logits_scale = positive_real(hf, "logits_scaling", 1.0)
        read_moe(cfg, hf, experts_key="num_local_experts", intermediate_key="intermediate_size")
        cfg.moe_layers = list(range(cfg.num_layers))
        cfg.num_moe_layers = cfg.num_layers
        cfg.norm_topk_prob = True

    def make_mlp(self, cfg: ModelConfig, layer: int) -> nn.Module:
        return SparseMoE(
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.num_experts,
            cfg.top_k,
            renormalize=True,
            weights_in_model_dtype=True,
        )
