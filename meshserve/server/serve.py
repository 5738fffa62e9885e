"""``meshserve serve``: load the model, start the engine thread, serve HTTP until SIGTERM / Ctrl-C.

uvicorn handles the signal: it stops accepting connections and lets open responses finish for
``graceful_shutdown_s``. Requests still open then are cut cleanly: each stream gets a final error event
and ``[DONE]`` (a waiting non-streaming request a 503), and the log says how many were cut. Then the
app's lifespan shuts the engine down and the process exits 0.

Connections are bounded with uvicorn's own settings (``limit_concurrency``, keep-alive and header
size), every request head (a connection's first, and each later one on a keep-alive connection) must
be complete within HEADER_TIMEOUT_S, and a body that stalls is refused by the app (app.BODY_TIMEOUT_S).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshserve.config import EngineConfig
from meshserve.engine.async_llm import AsyncLLM
from meshserve.errors import integer, number
from meshserve.memory import pin_malloc_thresholds

logger = logging.getLogger(__name__)

MAX_GRACE_S = 3600.0
MAX_CONNECTIONS = 1024  # open connections served at once; a request on one more gets 503 from uvicorn
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
MAX_HEADER_BYTES = 64 << 10  # h11: a request head larger than this is refused
CUT_MARGIN_S = 2.0  # after the grace period, time for cut streams to send their last event
HEADER_TIMEOUT_S = 10.0  # from a connection's start or its last response: the next head is complete by then


def graceful_server(config: Any, grace_s: float, cut: Callable[[str], int]) -> Any:
    """A uvicorn.Server whose graceful shutdown ends the requests still open after ``grace_s`` cleanly
    (``cut``: the app's cut_streams) instead of cancelling them mid-stream."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            def deadline() -> None:
                n = cut(f"server shutting down: cut after the {grace_s:g} s grace period")
                logger.warning("shutdown: grace period of %g s over, %d open request(s) cut", grace_s, n)

            timer = asyncio.get_running_loop().call_later(grace_s, deadline)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return Server(config)


def _h11_with_header_timeout() -> type:
    """uvicorn's h11 protocol (its header size limit applies), closing a connection whose next request
    head is not complete within HEADER_TIMEOUT_S of the connection's start or of its last response.
    uvicorn's keep-alive timer covers only a silent connection: the first byte of a head cancels it, and
    nothing else would bound a head dribbled a byte at a time."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_timer = None
            self._await_head()

        def on_response_complete(self) -> None:
            self._await_head()  # before uvicorn starts a pipelined request, which then disarms it
            super().on_response_complete()

        def _await_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._head_timeout, self.cycle)

        def _head_timeout(self, last: Any) -> None:
            """Close unless a request began since the timer was armed (uvicorn starts a cycle per head)."""
            if self.cycle is last and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

    return Protocol


def server_config(
    app: Any, host: str, port: int, log_level: str, grace_s: float, max_connections: int = MAX_CONNECTIONS
) -> Any:
    """uvicorn's settings: the connection cap, keep-alive, header size, and the hard shutdown limit."""
    import uvicorn

    integer(max_connections, "max_connections", 1)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=grace_s + CUT_MARGIN_S,
        # uvicorn answers 503 once the open connections (this one included) reach its limit
        limit_concurrency=max_connections + 1,
        timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        http=_h11_with_header_timeout(),
    )


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    max_waiting: int | None = None,
    graceful_shutdown_s: float = 10.0,
    log_level: str = "info",
    max_connections: int = MAX_CONNECTIONS,
    tool_call_parser: str | None = None,
    api_key: str | None = None,
    task: str = "auto",
    trace_file: str | None = None,
    pd_connect: str | None = None,
    **engine_args: Any,
) -> None:
    """Serve ``model`` (a Hugging Face-format directory) over the OpenAI API until stopped. ``api_key``
    (else MESHSERVE_API_KEY): required on /v1 routes; ``task``: auto, generate or embed; ``trace_file``:
    write every step's and request's timeline there (JSON lines, engine/timeline.py); ``pd_connect``:
    "prefill=HOST:PORT,decode=HOST:PORT", instances started with ``meshserve serve --role``."""
    from meshserve import switches
    from meshserve.server.app import build_app
    from meshserve.server.tasks import check_task

    number(graceful_shutdown_s, "graceful_shutdown_s", 0.0, MAX_GRACE_S)
    integer(max_connections, "max_connections", 1)  # before the model loads
    check_task(task)
    api_key = api_key or switches.value("MESHSERVE_API_KEY") or None
    pin_malloc_thresholds()  # a long-running engine: steps reuse heap memory, RSS flat after warm-up
    if pd_connect is None:
        llm = AsyncLLM.from_args(model, max_waiting=max_waiting, trace_file=trace_file, **engine_args)
    else:  # a front door over prefill / decode instances started on their own (engine/pd/remote.py)
        from meshserve.engine.pd.remote import connect

        engine = connect(EngineConfig.from_args(model, **engine_args), pd_connect, api_key)
        llm = AsyncLLM(engine, max_waiting, trace_file=trace_file)
    name = served_model_name or Path(model).name  # never the server's filesystem path
    aliases = () if served_model_name else (model,)
    app = build_app(llm, name, aliases=aliases, tool_parser=tool_call_parser, api_key=api_key, task=task)
    config = server_config(app, host, port, log_level, graceful_shutdown_s, max_connections)
    logger.info("serving %s as %r on http://%s:%d", model, name, host, port)
    # uvicorn shuts down gracefully on these signals, then re-raises them to the handlers it found:
    # make those a no-op so a graceful stop exits 0 instead of dying by the signal afterwards.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    graceful_server(config, graceful_shutdown_s, app.state.cut_streams).run()
    # The lifespan gave the engine 10 s to close; closing torchrun's ranks may take longer on a loaded host,
    # and a process that exits while its engine thread still holds the process groups aborts in C++.
    llm.shutdown(timeout=None)


def _stopped(signum: int, frame: object) -> None:
    logger.info("stopped by signal %d", signum)


class ServerThread:
    """An in-process server on 127.0.0.1 in a background thread (tests, benchmarks); ``stop()`` ends it."""

    def __init__(
        self,
        llm: AsyncLLM,
        served_model_name: str,
        port: int,
        log_level: str = "warning",
        grace_s: float = 10.0,
        max_connections: int = MAX_CONNECTIONS,
        **app_args: Any,
    ) -> None:
        import threading
        import time

        from meshserve.server.app import build_app

        self.llm, self.url = llm, f"http://127.0.0.1:{port}"
        app = build_app(llm, served_model_name, **app_args)
        config = server_config(app, "127.0.0.1", port, log_level, grace_s, max_connections)
        self.server = graceful_server(config, grace_s, app.state.cut_streams)
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
