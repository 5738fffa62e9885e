"""Qwen2 (dense): Llama with biases on the q/k/v projections."""

from __future__ import annotations

from typing import Any

from meshserve.models.config import ModelConfig, positive
from meshserve.models.decoder import DecoderLM


class Qwen2ForCausalLM(DecoderLM):
    """Qwen2 / Qwen2.5 dense models."""

    @classmethod
    def configure(cls, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        cfg.qkv_bias = True
        if "layer_types" not in hf:  # Qwen2's rule: layers from max_window_layers on slide
            first = positive(hf, "max_window_layers", 28)
            cfg.layer_windows = [w if i >= first else None for i, w in enumerate(cfg.layer_windows)]
