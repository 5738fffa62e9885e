"""POST /tokenize and /detokenize with vLLM's request and response shapes.

/tokenize takes a ``prompt`` (``add_special_tokens`` defaults to true) or chat ``messages`` rendered with
the model's chat template (``add_special_tokens`` defaults to false: the template writes its own) and
answers ``{"count", "max_model_len", "tokens", "token_strs"}``; /detokenize takes ``tokens`` and answers
``{"prompt"}``. Both run the tokenizer in a worker thread, never on the event loop or the engine thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter

from meshserve.errors import require
from meshserve.server.protocol import _Strict


class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    model: str | None = None
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def tokenize_router(
    tokenizer: Any, max_model_len: int, check_model: Callable[[str | None], None]
) -> APIRouter:
    """/tokenize and /detokenize with the served model's tokenizer."""
    router = APIRouter()
    vocab = tokenizer.vocab_size

    @router.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
        check_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            ids = await asyncio.to_thread(
                tokenizer.apply_chat_template,
                body.messages,
                body.add_generation_prompt,
                add_special_tokens=body.add_special_tokens,
            )
        else:
            ids = await asyncio.to_thread(tokenizer.encode, body.prompt, body.add_special_tokens)
        strs = (
            [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
            if body.return_token_strs
            else None
        )
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        check_model(body.model)
        require(
            all(0 <= t < vocab for t in body.tokens),
            "tokens",
            f"token ids must be in [0, {vocab - 1}] (vocab_size={vocab})",
        )
        return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens, False)}

    return router
