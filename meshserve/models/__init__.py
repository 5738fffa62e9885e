"""Hugging Face-format models (registry.ARCHITECTURES: Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, and the MoE
families Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE) over flat batches and paged KV."""

from meshserve.models.batch import BatchMetadata
from meshserve.models.config import ModelConfig
from meshserve.models.loader import LoadedModel, load_model
from meshserve.models.registry import ARCHITECTURES
from meshserve.models.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
    "ARCHITECTURES",
    "BatchMetadata",
    "IncrementalDetokenizer",
    "LoadedModel",
    "ModelConfig",
    "Tokenizer",
    "load_model",
]
