"""Phi-3 / Phi-4: checkpoints already hold q/k/v fused (qkv_proj) and gate/up fused (gate_up_proj), as our
layers do; LongRoPE scaling (saved as "longrope", or "su" / "yarn" by older configs), optional partial
rotary (Phi-4-mini), and a sliding window on every layer when config.json sets one."""

from __future__ import annotations

from typing import Any

from meshserve.errors import InputError
from meshserve.models.config import ModelConfig, positive
from meshserve.models.decoder import DecoderLM

LONGROPE_ALIASES = ("su", "yarn")  # what Phi3Config renames to longrope


class Phi3ForCausalLM(DecoderLM):
    """Phi-3-mini/small/medium, Phi-3.5-mini, Phi-4, Phi-4-mini."""

    @classmethod
    def configure(cls, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        scaling = cfg.rope_scaling
        if scaling is None:
            return
        if scaling["rope_type"] in LONGROPE_ALIASES:
            scaling["rope_type"] = "longrope"
        if scaling["rope_type"] != "longrope":
            raise InputError(
                "config.json:rope_scaling",
                f"unsupported rope_type {scaling['rope_type']!r}; allowed: longrope",
            )
        if scaling.get("original_max_position_embeddings") is None:  # Phi-3 keeps it at the top level
            scaling["original_max_position_embeddings"] = positive(hf, "original_max_position_embeddings")
