"""Mistral: Llama with a sliding window on every layer whenever config.json sets sliding_window."""

from __future__ import annotations

from meshserve.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral 7B / Ministral / Mistral-Nemo (explicit head_dim); the window is config.py's rule for it."""
