"""DeepSeek-V2 / V3: multi-head latent attention (layers/mla.py) and grouped-routing MoE with shared experts
(layers/grouped_moe.py) in the shared decoder. Layer i is MoE when i >= first_k_dense_replace and
i % moe_layer_freq == 0. The multi-token-prediction layers a V3 checkpoint may carry
(num_nextn_predict_layers, stored as layers past num_hidden_layers) are left unread unless speculation asks
for them (cfg.use_mtp): then the first is built as `mtp` (models/mtp.py) and drafts (engine/spec/mtp.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from meshserve.models.batch import BatchMetadata
from meshserve.models.config import ModelConfig, positive, read_moe
from meshserve.models.decoder import DecoderLM
from meshserve.models.layers.attention import StepInputs
from meshserve.models.layers.grouped_moe import GroupedMoE, read_routing
from meshserve.models.layers.mla import LatentAttention, read_mla
from meshserve.models.layers.mlp import GatedMLP
from meshserve.models.mtp import MTPLayer


def _non_negative(hf: dict[str, Any], key: str, default: int) -> int:
    return default if hf.get(key) in (None, 0) else positive(hf, key)


class DeepseekV2ForCausalLM(DecoderLM):
    """DeepSeek-V2 / V2-Lite: softmax routing (greedy or group-limited), RoPE on interleaved pairs."""

    config_aliases: ClassVar[dict[str, str]] = {"num_experts": "n_routed_experts"}
    scoring, topk_method, norm_topk_prob, interleave = "softmax", "greedy", False, True
    rope_in_float32 = True  # transformers' V2 rotates as a float32 complex product, then rounds

    @classmethod
    def configure(cls, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        read_mla(cfg, hf, interleave_default=cls.interleave)
        read_moe(cfg, hf, experts_key="n_routed_experts", intermediate_key="moe_intermediate_size")
        read_routing(cfg, hf, cls.scoring, cls.topk_method, cls.norm_topk_prob)
        first_dense = _non_negative(hf, "first_k_dense_replace", 0)
        freq = positive(hf, "moe_layer_freq", 1)
        cfg.num_mtp_layers = _non_negative(hf, "num_nextn_predict_layers", 0)
        moe = [i for i in range(cfg.num_layers + 1) if i >= first_dense and i % freq == 0]
        cfg.moe_layers, cfg.mtp_moe = [i for i in moe if i < cfg.num_layers], cfg.num_layers in moe
        cfg.num_moe_layers = len(cfg.moe_layers)
        cfg.shared_expert_intermediate_size = cfg.moe_intermediate_size * _non_negative(
            hf, "n_shared_experts", 0
        )
        cfg.norm_topk_prob = cfg.routing.norm_topk_prob

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        q_name = "q_proj" if cfg.mla.q_lora_rank is None else "q_a_proj"
        self.fusions = {"qkv_proj": (q_name, "kv_a_proj_with_mqa")}  # the projections reading the input
        if cfg.use_mtp:  # the checkpoint's layer num_hidden_layers; its tensors are read only then
            n = cfg.num_layers
            mlp = GroupedMoE(cfg) if cfg.mtp_moe else GatedMLP(cfg.hidden_size, cfg.intermediate_size)
            self.mtp = MTPLayer(cfg, mlp, self.make_attention(cfg, None))
            self.checkpoint_aliases = (*self.checkpoint_aliases, ("model.mtp.", f"model.layers.{n}."))
            self.draft_moe_layers = int(cfg.mtp_moe and bool(self._moe))

    def draft_expert_counts(self) -> torch.Tensor:
        """The MTP layer's counts (a draft layer), summed over its forwards since the last call."""
        return self.mtp.take_counts()[None] if self.draft_moe_layers else super().draft_expert_counts()

    def make_attention(self, cfg: ModelConfig, window: int | None) -> nn.Module:
        return LatentAttention(cfg, window)

    def step_inputs(self, meta: BatchMetadata, dtype: torch.dtype, cache: torch.Tensor) -> StepInputs:
        return super().step_inputs(meta, torch.float32 if self.rope_in_float32 else dtype, cache)

    def make_mlp(self, cfg: ModelConfig, layer: int) -> nn.Module:
        if layer not in cfg.moe_layers:
            return GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        return GroupedMoE(cfg)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3 / R1: sigmoid scores, noaux_tc group selection with the correction bias, renormalised."""

    config_aliases: ClassVar[dict[str, str]] = {
        "num_experts": "n_routed_experts",
        "num_local_experts": "n_routed_experts",
        "num_mtp_layers": "num_nextn_predict_layers",
    }
    scoring, topk_method, norm_topk_prob = "sigmoid", "noaux_tc", True
    rope_in_float32 = False  # V3 rotates in the model's dtype, as transformers does
