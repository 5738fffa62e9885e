"""Serving engine: requests, token-budget scheduling, paged KV cache, model runner, sampler.

from meshserve.engine import LLM, SamplingParams
"""

from meshserve.engine.engine import Engine
from meshserve.engine.llm import LLM
from meshserve.engine.outputs import CompletionOutput, RequestOutput
from meshserve.engine.pooling import PoolingParams
from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.structured_params import StructuredOutputsParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "Engine",
    "PoolingParams",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
]
