"""GraniteMoE: Mixtral's layout with IBM's four multipliers (embeddings, residual branches, attention
scores, logits) and experts stored stacked (input_linear = [gate; up], output_linear) with a router."""

from __future__ import annotations

from typing import Any

from meshserve.models.config import ModelConfig, flag, positive_real
from meshserve.models.decoder import DecoderLM
from meshserve.models.mixtral import MixtralForCausalLM


class GraniteMoeForCausalLM(MixtralForCausalLM):
    """granite-3.0-1b-a400m / 3b-a800m. Routing is softmax over the top-k logits, the same weights as
    softmax, top-k and renormalisation."""

    config_aliases = DecoderLM.config_aliases
    expert_names = DecoderLM.expert_names
    weights_in_model_dtype = True  # as transformers' GraniteMoE scales expert outputs in the model's dtype
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
        super().configure(cfg, hf)  # Mixtral's MoE fields: every layer sparse, renormalised top-k
