"""--api-key: every /v1 and /admin route, /tokenize and /detokenize need ``Authorization: Bearer <key>``.

Without it (or with another key) the answer is 401 in OpenAI's error shape. The key is compared in
constant time (``hmac.compare_digest``), so response times say nothing about how much of a guess was
right. /health and /metrics stay open (load balancers and Prometheus scrape them without a key).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse


def protected(path: str) -> bool:
    return path == "/v1" or path.startswith(("/v1/", "/admin/")) or path in ("/tokenize", "/detokenize")


class ApiKey:
    """ASGI middleware refusing protected paths whose bearer token is not ``key``."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and protected(scope["path"]):
            given = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                error = {
                    "message": "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    "type": "AuthenticationError",
                    "param": None,
                    "code": 401,
                }
                response = JSONResponse({"error": error}, 401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
