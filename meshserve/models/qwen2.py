"""Qwen2 (dense): Llama with biases on the q/k/v projections."""

from __future__ import annotations

from typing import Any

from meshserve.models.config import ModelConfig
from meshserve.models.decoder import DecoderLM


class Qwen2ForCausalLM(DecoderLM):
    """Qwen2 / Qwen2.5 dense models."""

    @classmethod
    def configure(cls, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        cfg.qkv_bias = True
