"""POST /v1/embeddings in OpenAI's shape: one vector per input (text or token ids), as floats or base64.

Each input becomes a pooling request (engine/pooling.py): prefill only, batched by the engine with
whatever else runs, its KV freed when its prompt ends. The pooling is the model's (a
sentence-transformers config, else LAST), L2-normalized unless the request sends vLLM's
``"normalize": false``. base64 is little-endian float32, as OpenAI's client decodes it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import uuid
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter

from meshserve.engine.async_llm import AsyncLLM, RequestStream
from meshserve.engine.outputs import RequestOutput
from meshserve.engine.pooling import PoolingParams
from meshserve.errors import require
from meshserve.server.protocol import _Strict

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings: a string, a list of strings, token ids, or a list of token-id lists."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    normalize: bool | None = None  # vLLM's extension: False returns the raw pooled vector

    def inputs(self) -> list[str | list[int]]:
        given = self.input
        if isinstance(given, str) or (given and isinstance(given[0], int)):
            return [given]
        require(
            0 < len(given) <= MAX_INPUTS, "input", f"must hold 1 to {MAX_INPUTS} inputs, got {len(given)}"
        )
        return list(given)


def encode(vector: Any, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


async def _last(stream: RequestStream) -> RequestOutput:
    return [out async for out in stream][-1]


def embeddings_router(
    llm: AsyncLLM, served_model_name: str, check_model: Callable[[str | None], None], pooling: PoolingParams
) -> APIRouter:
    """The /v1/embeddings route over ``llm``, pooling with ``pooling`` unless a request says otherwise."""
    router = APIRouter()
    hidden = llm.engine.model_config.hidden_size

    @router.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        check_model(body.model)
        require(
            body.dimensions in (None, hidden),
            "dimensions",
            f"this model's embeddings have {hidden} dimensions (no Matryoshka truncation), "
            f"got {body.dimensions}",
        )
        params = pooling if body.normalize is None else dataclasses.replace(pooling, normalize=body.normalize)
        streams: list[RequestStream] = []
        try:  # all or nothing: queued inputs are aborted when one is refused or the client goes
            for prompt in body.inputs():
                streams.append(await llm.add_request(prompt, params, f"embd-{uuid.uuid4().hex}"))
            outs = await asyncio.gather(*map(_last, streams))
        finally:
            for stream in streams:
                stream.abort()
        data = [
            {"object": "embedding", "index": i, "embedding": encode(out.embedding, body.encoding_format)}
            for i, out in enumerate(outs)
        ]
        tokens = sum(len(out.prompt_token_ids) for out in outs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": served_model_name, "usage": usage}

    return router
