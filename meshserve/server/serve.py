"""``meshserve serve``: load the model, start the engine thread, serve HTTP until SIGTERM / Ctrl-C.

uvicorn handles the signal: it stops accepting connections, lets open responses finish (up to
``graceful_shutdown_s``), then the app's lifespan shuts the engine down (what is left is aborted)
and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from meshserve.engine.async_llm import AsyncLLM
from meshserve.memory import pin_mmap_threshold

logger = logging.getLogger(__name__)


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    max_waiting: int | None = None,
    graceful_shutdown_s: float = 10.0,
    log_level: str = "info",
    **engine_args: Any,
) -> None:
    """Serve ``model`` (a Hugging Face-format directory) over the OpenAI API until stopped."""
    import uvicorn

    from meshserve.server.app import build_app

    pin_mmap_threshold()  # a long-running engine: freed tensors go back to the OS, RSS stays flat
    llm = AsyncLLM.from_args(model, max_waiting=max_waiting, **engine_args)
    name = served_model_name or model
    app = build_app(llm, name)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_shutdown_s
    )
    logger.info("serving %s as %r on http://%s:%d", model, name, host, port)
    # uvicorn shuts down gracefully on these signals, then re-raises them to the handlers it found:
    # make those a no-op so a graceful stop exits 0 instead of dying by the signal afterwards.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    uvicorn.Server(config).run()


def _stopped(signum: int, frame: object) -> None:
    logger.info("stopped by signal %d", signum)
