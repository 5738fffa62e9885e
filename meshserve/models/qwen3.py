"""Qwen3 (dense): Qwen2's layout and sliding rule with per-head RMSNorm on q and k and no q/k/v bias."""

from __future__ import annotations

from typing import Any

from meshserve.models.config import ModelConfig, flag
from meshserve.models.qwen2 import Qwen2ForCausalLM


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    """Qwen3-0.6B ... 32B dense models."""

    @classmethod
    def configure(cls, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        super().configure(cfg, hf)
        cfg.qkv_bias = cfg.o_bias = flag(hf, "attention_bias", False)
        cfg.qk_norm = True
