"""What a server is for: ``generate`` (completions and chat, plus embeddings from the same weights) or
``embed`` (embeddings only). ``auto`` picks embed for an embedding checkpoint: an architecture named
``...Model`` (no LM head) or a sentence-transformers module list beside the weights, as vLLM does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse

from meshserve.errors import require
from meshserve.models.config import ModelConfig

TASKS = ("auto", "generate", "embed")
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")


def check_task(task: str) -> str:
    require(task in TASKS, "task", f"must be one of {', '.join(TASKS)}, got {task!r}")
    return task


def resolve_task(task: str, mc: ModelConfig) -> str:
    """``generate`` or ``embed`` for ``task`` on the model ``mc``."""
    if check_task(task) != "auto":
        return task
    return "embed" if mc.arch.endswith("Model") or mc.pooling_defaults else "generate"


class EmbedOnly:
    """ASGI middleware of an ``embed`` server: the generation routes answer 400 saying why."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] in GENERATE_PATHS:
            error = {
                "message": "model: this server runs task 'embed' (POST /v1/embeddings); "
                "start it with --task generate to generate",
                "type": "BadRequestError",
                "param": "model",
                "code": 400,
            }
            await JSONResponse({"error": error}, 400)(scope, receive, send)
            return
        await self.app(scope, receive, send)
