"""Llama: the plain decoder (RMSNorm, RoPE, GQA, SiLU-gated MLP); attention_bias adds q/k/v/o biases."""

from __future__ import annotations

from typing import Any

from meshserve.errors import InputError
from meshserve.models.config import ModelConfig, flag
from meshserve.models.decoder import DecoderLM


class LlamaForCausalLM(DecoderLM):
    """Llama 2 / 3 family."""

    @classmethod
    def configure(cls, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        cfg.qkv_bias = cfg.o_bias = flag(hf, "attention_bias", False)
        if flag(hf, "mlp_bias", False):
            raise InputError("config.json:mlp_bias", "MLP biases are not supported; allowed: false")
