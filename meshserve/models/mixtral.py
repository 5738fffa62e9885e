"""Mixtral: Llama attention with a top-k MoE (always renormalised) in every layer."""

from __future__ import annotations

from typing import Any

from torch import nn

from meshserve.models.config import ModelConfig, read_moe
from meshserve.models.decoder import DecoderLM
from meshserve.models.layers.moe import SparseMoE


class MixtralForCausalLM(DecoderLM):
    """Mixtral 8x7B-style sparse MoE; checkpoints call the block `block_sparse_moe`, experts w1/w3/w2."""

    checkpoint_aliases = ((".mlp.", ".block_sparse_moe."),)
    config_aliases = {"num_experts": "num_local_experts"}  # transformers' attribute_map
    expert_names = ("w1", "w3", "w2")
    weights_in_model_dtype = False  # the routing weights multiply float32 expert outputs

    @classmethod
    def configure(cls, cfg: ModelConfig, hf: dict[str, Any]) -> None:
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
            weights_in_model_dtype=self.weights_in_model_dtype,
        )
