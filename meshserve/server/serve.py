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
    # The lifespan gave the engine 10 s to close; closing torchrun's ranks may take longer on a loaded host,
    # and a process that exits while its engine thread still holds the process groups aborts in C++.
    llm.shutdown(timeout=None)


def _stopped(signum: int, frame: object) -> None:
    logger.info("stopped by signal %d", signum)


class ServerThread:
    """An in-process server on 127.0.0.1 in a background thread (tests, benchmarks); ``stop()`` ends it."""

    def __init__(self, llm: AsyncLLM, served_model_name: str, port: int, log_level: str = "warning") -> None:
        import threading
        import time

        import uvicorn

        from meshserve.server.app import build_app

        self.llm, self.url = llm, f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            build_app(llm, served_model_name), host="127.0.0.1", port=port, log_level=log_level
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server on port {port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
