"""Hugging Face-format models (Llama, Qwen2, Mixtral, Qwen2-MoE, Qwen3-MoE) over flat batches and paged KV."""

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
