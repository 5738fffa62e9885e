"""meshserve: hybrid P/D/V LLM serving (XY-Serve) and wafer-scale MoE planning (MoEntwine).

    from meshserve import LLM, SamplingParams

The engine names load on first use, so the wafer planner never pays for importing torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "AsyncLLM",
    "Engine",
    "PoolingParams",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
]

_ENGINE_NAMES = {
    "LLM",
    "Engine",
    "PoolingParams",
    "RequestOutput",
    "SamplingParams",
    "CompletionOutput",
    "StructuredOutputsParams",
}


def __getattr__(name: str) -> Any:
    if name in _ENGINE_NAMES:
        import meshserve.engine as engine

        return getattr(engine, name)
    if name == "AsyncLLM":
        from meshserve.engine.async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(f"module 'meshserve' has no attribute {name!r}")
