"""Gemma 2 and 3: sandwich norms (each block's input and output normed) with Gemma's (1 + weight) RMSNorm,
tanh-GELU MLP, embeddings times sqrt(hidden), scores scaled by query_pre_attn_scalar, sliding and global
layers alternating; Gemma 2 soft-caps attention scores and logits, Gemma 3 norms q and k per head and
rotates its sliding layers with their own rope (rope_local_base_freq)."""

from __future__ import annotations

from typing import Any

import torch

from meshserve.errors import InputError
from meshserve.models.config import (
    ModelConfig,
    activation,
    flag,
    optional_real,
    positive,
    positive_real,
    rope,
)
from meshserve.models.decoder import DecoderLM


def _read_gemma(cfg: ModelConfig, hf: dict[str, Any], pattern: int) -> None:
    """What Gemma 2 and 3 share; `pattern`: every pattern-th layer is global when layer_types is absent."""
    cfg.hidden_act = activation(hf, "hidden_activation" if hf.get("hidden_activation") else "hidden_act")
    cfg.norm_offset = 1.0
    cfg.sandwich_norms = True
    cfg.qkv_bias = cfg.o_bias = flag(hf, "attention_bias", False)
    cfg.attention_scale = positive_real(hf, "query_pre_attn_scalar", 256.0) ** -0.5
    # transformers multiplies by sqrt(hidden) rounded to the model dtype
    cfg.embedding_scale = float(torch.tensor(cfg.hidden_size**0.5, dtype=cfg.dtype))
    cfg.tie_word_embeddings = flag(hf, "tie_word_embeddings", True)
    cfg.attn_logit_softcap = optional_real(hf, "attn_logit_softcapping")
    cfg.final_logit_softcap = optional_real(hf, "final_logit_softcapping")
    if flag(hf, "use_bidirectional_attention", False):
        raise InputError("config.json:use_bidirectional_attention", "only causal attention is served")
    if "layer_types" not in hf:
        globals_ = [(i + 1) % pattern == 0 for i in range(cfg.num_layers)]
        cfg.layer_windows = [None if g else w for g, w in zip(globals_, cfg.layer_windows, strict=True)]


class Gemma2ForCausalLM(DecoderLM):
    """gemma-2-2b / 9b / 27b. Its soft-capped attention runs in the torch attention path."""

    @classmethod
    def configure(cls, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        _read_gemma(cfg, hf, pattern=2)


class Gemma3ForCausalLM(DecoderLM):
    """gemma-3-1b and the text half of the larger Gemma 3 models, saved as Gemma3ForCausalLM."""

    @classmethod
    def configure(cls, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        _read_gemma(cfg, hf, pattern=positive(hf, "sliding_window_pattern", 6))
        cfg.qk_norm = True
        params = hf.get("rope_parameters")
        nested = isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict)
        if "rope_theta" not in hf and not isinstance(params, dict):  # Gemma 3's global default
            cfg.rope_theta = 1_000_000.0
        if nested:
            cfg.local_rope_theta, local_scaling = rope(hf, "sliding_attention")
            if local_scaling is not None:
                raise InputError(
                    "config.json:rope_parameters.sliding_attention", "only default rope is supported here"
                )
        else:
            cfg.local_rope_theta = positive_real(hf, "rope_local_base_freq", 10_000.0)
