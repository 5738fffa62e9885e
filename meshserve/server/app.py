"""The OpenAI-compatible HTTP server: FastAPI routes over an AsyncLLM.

/v1/completions and /v1/chat/completions (JSON or SSE streams), /v1/models, /health, /metrics; and from
their own modules /v1/embeddings (embeddings.py), /tokenize and /detokenize (tokenize.py), --api-key
(auth.py) and --task (tasks.py).
Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
parameters (named in ``param``), 404 for an unknown model, 503 with Retry-After when the waiting
queue is full. A client that goes away has its request aborted and its KV blocks freed at once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from meshserve.engine.async_llm import AsyncLLM, EngineBusy, EngineDead, RequestStream
from meshserve.engine.pooling import PoolingParams
from meshserve.engine.sampling_params import check_choices
from meshserve.engine.timeline import now
from meshserve.errors import InputError, require
from meshserve.server.admin import add_admin_routes
from meshserve.server.auth import ApiKey
from meshserve.server.embeddings import embeddings_router
from meshserve.server.metrics import ServerMetrics
from meshserve.server.protocol import ChatCompletionRequest, CompletionRequest
from meshserve.server.responses import ChoiceState, chat_chunk, completion_chunk, usage
from meshserve.server.structured import constrained
from meshserve.server.tasks import EmbedOnly, resolve_task
from meshserve.server.tokenize import tokenize_router
from meshserve.server.tool_parsers import PARSERS
from meshserve.server.tool_stream import ToolStream
from meshserve.server.tools import message_with_calls, plan_tools

RETRY_AFTER_S = 1
MAX_BODY_BYTES = 4 << 20  # far above max_model_len tokens of text; larger bodies get 413 unread
BODY_TIMEOUT_S = 30.0  # a client that sends no body bytes for this long gets 408 (slow-body clients)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(
    status: int, message: str, kind: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class RequestFailed(Exception):
    """The engine ended this request with finish_reason "error" (its own sampling failed; 500)."""


class BodyLimit:
    """ASGI middleware: a request whose Content-Length is over ``limit`` gets 413 without being read; one
    without it (chunked) is counted as it streams in and refused at the first byte past the limit."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # the request's arrival (its timeline's start): before the body is read, parsed and tokenized
        scope.setdefault("state", {})["arrival"] = now()
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.limit):
            await self._refuse(scope, receive, send, size.decode("latin-1")[:40])
            return
        received, body_done = 0, False

        async def counted() -> dict:
            nonlocal received, body_done
            if body_done:  # a response waiting for the client to go away (a stream): no time limit
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), BODY_TIMEOUT_S)
            except TimeoutError:
                raise StarletteHTTPException(408, f"body: no bytes for {BODY_TIMEOUT_S:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.limit:  # FastAPI passes HTTPExceptions from reading the body through
                    raise StarletteHTTPException(413, f"body: at most {self.limit} bytes, got more")
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable, size: str) -> None:
        response = error_response(
            413, f"body: at most {self.limit} bytes, got {size}", "BadRequestError", "body"
        )
        await response(scope, receive, send)


def build_app(
    llm: AsyncLLM,
    served_model_name: str,
    on_shutdown: Callable[[], None] | None = None,
    aliases: tuple[str, ...] = (),
    tool_parser: str | None = None,
    api_key: str | None = None,
    task: str = "auto",
) -> FastAPI:
    """The FastAPI app serving ``llm`` under ``served_model_name`` (requests may also name an alias,
    e.g. the model directory given on the command line; only the served name is ever shown).
    ``tool_parser``: how tool calls are read from text under tool_choice auto (server/tool_parsers.py);
    ``api_key``: required on /v1 and (de)tokenize; ``task``: tasks.py."""
    require(
        tool_parser is None or tool_parser in PARSERS,
        "tool_call_parser",
        f"must be one of {', '.join(PARSERS)}, got {tool_parser!r}",
    )
    metrics = ServerMetrics(served_model_name)
    llm.on_step, llm.on_abort, llm.on_finish = metrics.on_step, metrics.forget, metrics.on_finish
    engine = llm.engine
    tokenizer = engine.tokenizer
    defaults = dict(engine.model_config.generation_defaults)
    grammars = getattr(engine, "grammars", None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        (on_shutdown or llm.shutdown)()

    app = FastAPI(title="meshserve", version="0.1.0", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    if resolve_task(task, engine.model_config) == "embed":
        app.add_middleware(EmbedOnly)
    if api_key:  # added last: runs first, before the body is read
        app.add_middleware(ApiKey, key=api_key)
    add_admin_routes(app, llm)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": ("body",), "msg": "invalid body"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            loc = []
        param = loc[0] if loc else "body"  # the top-level field; the message has the full path
        where = ".".join(loc) or "body"
        return error_response(400, f"{where}: {first.get('msg', 'invalid')}", "BadRequestError", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        # e.g. a body that is not UTF-8 JSON, an unknown route or method
        kind = "NotFoundError" if err.status_code == 404 else "BadRequestError"
        return error_response(
            err.status_code,
            f"body: {err.detail}" if err.status_code == 400 else str(err.detail),
            kind,
            "body" if err.status_code in (400, 408, 413) else None,
            headers=err.headers,
        )

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err.status, err.message, err.kind, err.param)

    @app.exception_handler(InputError)
    async def input_error(request: Request, err: InputError) -> JSONResponse:
        return error_response(400, str(err), "BadRequestError", err.field)

    @app.exception_handler(EngineBusy)
    async def busy(request: Request, err: EngineBusy) -> JSONResponse:
        return error_response(
            503,
            f"server busy: {err}; retry later",
            "ServiceUnavailableError",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    @app.exception_handler(RequestFailed)
    async def failed(request: Request, err: RequestFailed) -> JSONResponse:
        return error_response(500, str(err), "InternalServerError")

    @app.exception_handler(EngineDead)
    async def dead(request: Request, err: EngineDead) -> JSONResponse:
        return error_response(503, f"engine unavailable: {err}", "ServiceUnavailableError")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if llm.alive else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": served_model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "meshserve",
            "root": served_model_name,  # never the server's filesystem path
            "max_model_len": engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name and name not in aliases:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {served_model_name!r}",
                "NotFoundError",
                "model",
            )

    def check_max_tokens(value: int | None, name: str) -> int | None:
        """A request can never get more than max_model_len tokens: asking for more is an error, as in vLLM."""
        limit = engine.max_model_len
        if value is not None and not isinstance(value, bool) and value > limit:
            raise InputError(
                name, f"must be <= max_model_len ({limit}) minus the prompt's tokens, got {value}"
            )
        return value

    open_streams: weakref.WeakSet[RequestStream] = weakref.WeakSet()

    def cut_streams(reason: str) -> int:
        """End every open request with EngineDead(reason): streams send it as their final error event
        and [DONE], waiting non-streaming requests answer 503. Returns how many requests were cut."""
        cut = [stream for stream in open_streams if not stream.finished]
        for stream in cut:
            stream.queue.put_nowait(EngineDead(reason))
        return len(cut)

    async def start(prompts: list[str | list[int]], params: Any, request: Request) -> list[RequestStream]:
        """Queue every prompt (all or nothing: on an error the ones queued are aborted)."""
        streams: list[RequestStream] = []
        arrival = getattr(request.state, "arrival", None)  # BodyLimit's stamp
        try:
            for prompt in prompts:
                streams.append(await llm.add_request(prompt, params, f"cmpl-{uuid.uuid4().hex}", arrival))
        except BaseException:
            for stream in streams:
                stream.abort()
            raise
        open_streams.update(streams)
        return streams

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        params = body.sampling_params(
            defaults, check_max_tokens(body.max_tokens, "max_tokens"), body.logprobs
        )
        params = await constrained(params, body, grammars)
        prompts = [p for p in body.prompts()]
        check_choices(len(prompts), len(prompts) * params.n, "prompt")
        streams = await start(prompts, params, request)
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served_model_name}
        states = [
            ChoiceState(i * params.n + k, tokenizer, body.logprobs is not None, chat=False)
            for i in range(len(streams))
            for k in range(params.n)
        ]
        prompt_tokens = [0] * len(streams)
        if body.stream:
            chunks = _merged(
                streams, params.n, states, prompt_tokens, lambda s, choices: completion_chunk(header, choices)
            )
            return StreamingResponse(
                _sse(chunks, header, states, prompt_tokens, body.include_usage, "text_completion", streams),
                media_type="text/event-stream",
            )
        await _until_done_or_gone(request, _collect(streams, params.n, states, prompt_tokens), streams)
        choices = [s.final_choice() for s in states]
        return JSONResponse(
            {**header, "object": "text_completion", "choices": choices, "usage": usage(prompt_tokens, states)}
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        max_tokens = check_max_tokens(body.completion_tokens(), "max_completion_tokens")
        params = body.sampling_params(defaults, max_tokens, body.num_logprobs())
        tools = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, tool_parser)
        params = await constrained(params, body, grammars, tools.structured)
        # off the event loop: a long chat takes a while to render and tokenize
        prompt = await asyncio.to_thread(
            tokenizer.apply_chat_template, body.messages, body.add_generation_prompt, tools.tools
        )
        streams = await start([prompt], params, request)
        header = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": served_model_name,
        }
        states = [ChoiceState(k, tokenizer, body.logprobs, chat=True) for k in range(params.n)]
        prompt_tokens = [0]
        if body.stream:
            rewrite = ToolStream(tools).chunk if tools.active else (lambda chunk: chunk)
            chunks = _merged(
                streams,
                params.n,
                states,
                prompt_tokens,
                lambda s, choices: rewrite(chat_chunk(header, choices)),
            )
            return StreamingResponse(
                _sse(
                    chunks,
                    header,
                    states,
                    prompt_tokens,
                    body.include_usage,
                    "chat.completion.chunk",
                    streams,
                ),
                media_type="text/event-stream",
            )
        await _until_done_or_gone(request, _collect(streams, params.n, states, prompt_tokens), streams)
        return JSONResponse(
            {
                **header,
                "object": "chat.completion",
                "choices": [message_with_calls(s.final_choice(), tools) for s in states],
                "usage": usage(prompt_tokens, states),
            }
        )

    pooling = PoolingParams(**engine.model_config.pooling_defaults)
    app.include_router(embeddings_router(llm, served_model_name, check_model, pooling))
    app.include_router(tokenize_router(tokenizer, engine.max_model_len, check_model))
    app.state.llm, app.state.metrics, app.state.cut_streams = llm, metrics, cut_streams
    return app


async def _merged(
    streams: list[RequestStream],
    n: int,
    states: list[ChoiceState],
    prompt_tokens: list[int],
    make_chunk: Callable[[Any, list[dict]], dict],
) -> AsyncIterator[dict]:
    """Chunks of all prompts' streams, interleaved as they arrive."""
    async with aclosing(_interleaved(streams)) as outputs:  # closed (streams aborted) when we are
        async for i, out in outputs:
            if failed := [c.error for c in out.outputs if c.finish_reason == "error"]:
                raise RequestFailed(f"request failed: {failed[0]}")
            prompt_tokens[i] = len(out.prompt_token_ids)
            if out.prompt_logprobs is not None:
                for state in states[i * n : (i + 1) * n]:
                    state.prompt_logprobs = out.prompt_logprobs
            choices = [c for comp in out.outputs if (c := states[i * n + comp.index].delta(comp)) is not None]
            if choices:
                yield make_chunk(out, choices)


async def _interleaved(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """(stream index, output) of every stream as outputs arrive; one stream (most requests) is read
    directly, with no relay task and queue between it and the response (one event-loop hop per delta)."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].abort()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except BaseException as err:
            await queue.put((i, err))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            i, out = await queue.get()
            if out is None:
                open_streams -= 1
                continue
            if isinstance(out, BaseException):
                raise out
            yield i, out
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


async def _collect(
    streams: list[RequestStream], n: int, states: list[ChoiceState], prompt_tokens: list[int]
) -> None:
    async for _ in _merged(streams, n, states, prompt_tokens, lambda out, choices: {}):
        pass


async def _until_done_or_gone(request: Request, work: Any, streams: list[RequestStream]) -> None:
    """Run ``work``; if the client disconnects first, abort its requests (their blocks free at once)."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        left = not task.done()  # (task.cancelled() stays False until the cancelled task runs again)
        if left:
            task.cancel()
            for stream in streams:
                stream.abort()
    if left:
        raise APIError(499, "client disconnected", "ClientClosedRequest")
    task.result()


async def _sse(
    chunks: AsyncIterator[dict],
    header: dict,
    states: list[ChoiceState],
    prompt_tokens: list[int],
    include_usage: bool,
    kind: str,
    streams: list[RequestStream],
) -> AsyncIterator[str]:
    """Server-sent events: one ``data:`` line per chunk, a usage chunk if asked, then ``[DONE]``."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        if include_usage:
            last = {**header, "object": kind, "choices": [], "usage": usage(prompt_tokens, states)}
            yield f"data: {json.dumps(last)}\n\n"
    except (InputError, EngineDead, RequestFailed) as err:  # headers are sent: report in the stream (vLLM)
        status, kind = (
            (400, "BadRequestError") if isinstance(err, InputError) else (500, "InternalServerError")
        )
        if isinstance(err, EngineDead):
            status, kind = 503, "ServiceUnavailableError"
        error = {"error": {"message": str(err), "type": kind, "code": status}}
        yield f"data: {json.dumps(error)}\n\n"
    finally:
        for stream in streams:
            stream.abort()
    yield "data: [DONE]\n\n"
