"""AsyncLLM: the engine for asyncio callers (the HTTP server). ``generate`` is an async stream of deltas.

One thread owns the Engine and runs its loop: take new requests and aborts from an inbox, run a step,
hand each step's outputs to the event loop. The event loop never waits on a forward; an add waits
for the end of the current step (where the engine is free to take it), an abort is applied there too
and frees the request's blocks before the next step. Nothing here knows HTTP. The engine thread only
steps: prompts are tokenized, streamed tokens detokenized and stop strings matched on the caller's side
(front_door.py), which aborts a completion in the engine once its stop string is found.

    llm = AsyncLLM.from_args("model_dir", max_num_seqs=32)
    async for out in llm.generate("Hello", SamplingParams(max_tokens=8)):
        print(out.outputs[0].text, end="")   # each output holds only what is new
    llm.shutdown()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from meshserve.config import EngineConfig, available_cores
from meshserve.engine.engine import Engine
from meshserve.engine.front_door import OutputText, PromptTokenizer
from meshserve.engine.llm import make_engine
from meshserve.engine.outputs import RequestOutput
from meshserve.engine.pooling import PoolingParams
from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.timeline import TimelineWriter, now
from meshserve.errors import InputError, require

logger = logging.getLogger(__name__)

StepHook = Callable[[Engine, list[RequestOutput]], None]

# Longest the engine thread waits for the event loop to take a step's outputs before it steps again: the
# loop's work on a step's deltas (text, SSE chunks, socket writes) is about 2 ms for 32 streams, and a loop
# that is busy elsewhere (or gone) must not hold the engine for longer than a step or two.
HANDOFF_WAIT_S = 0.02


class EngineBusy(Exception):
    """The waiting queue is full; the caller should retry later (HTTP 503 + Retry-After)."""


class EngineDead(Exception):
    """The engine thread stopped (shut down, or a step failed); no request can be served."""


class AsyncLLM:
    """An Engine run by its own thread; asyncio callers stream outputs and abort requests.

    max_waiting: most requests waiting for admission; more raise EngineBusy (None = no limit).
    on_step: called in the engine thread after every step with its outputs (metrics).
    trace_file: write every step's and finished request's timeline there (JSON lines, engine/timeline.py).
    """

    def __init__(
        self,
        engine: Engine,
        max_waiting: int | None = None,
        on_step: StepHook | None = None,
        trace_file: str | None = None,
    ) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_step = on_step
        self.trace = None if trace_file is None else TimelineWriter(trace_file)
        self.on_abort: Callable[[str], None] | None = None  # engine thread, after an abort (metrics)
        # engine thread, before that abort when the front door ended the request (stop strings): its output
        self.on_finish: Callable[[RequestOutput], None] | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any, concurrent.futures.Future | None]] = (
            queue.SimpleQueue()
        )
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._drained = threading.Event()  # the loop has ended: calls left in the inbox only get EngineDead
        # Set by the event loop once it has run the streams a step's outputs woke (see _run).
        self._taken = threading.Event()
        self._wait_for_loop = _no_spare_core(engine.config)
        self.error: BaseException | None = None
        self._tokenize = PromptTokenizer(engine.tokenizer)
        self._thread = threading.Thread(target=self._run, name="meshserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_args(
        cls, model: str, max_waiting: int | None = None, trace_file: str | None = None, **engine_args: Any
    ) -> AsyncLLM:
        return cls(
            make_engine(EngineConfig.from_args(model, **engine_args)), max_waiting, trace_file=trace_file
        )

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    async def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | PoolingParams,
        request_id: str | None = None,
        arrival: float | None = None,
    ) -> RequestStream:
        """Queue a request (PoolingParams: an embedding); returns its stream of outputs. Raises InputError
        / EngineBusy / EngineDead before anything is queued. Call ``stream.abort()`` when done with it
        early (in a finally). ``arrival``: when the caller received it (``timeline.now()``; default now),
        the start of its timeline."""
        arrival = now() if arrival is None else arrival
        request_id = f"req-{next(self._ids)}" if request_id is None else request_id
        require(request_id not in self._streams, "request_id", f"{request_id!r} is already in use")
        here = isinstance(params, SamplingParams)  # its text is made here, off the engine thread
        eos = self.engine.model_config.eos_token_ids
        stream = RequestStream(
            self, request_id, OutputText(self.engine.tokenizer, params, eos) if here else None
        )
        self._streams[request_id] = (asyncio.get_running_loop(), stream.queue)
        sent = False
        try:
            token_ids = await self._tokenize(prompt)
            sent = True
            stream.submitted = now()
            await self._call("add", (token_ids, params, request_id, not here, arrival))
        except BaseException as err:
            self._streams.pop(request_id, None)
            if sent and not isinstance(err, (InputError, EngineBusy, EngineDead)):
                self.abort(request_id)  # the caller left while the add was queued: nobody will read it
            raise
        return stream

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs: each holds the tokens / text its completions added since the
        last one; the last has ``finished``. Leaving the loop early (or cancelling) aborts the request."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str, index: int | None = None, ended: RequestOutput | None = None) -> None:
        """Abort a request (or only its completion ``index``); its blocks are freed before the engine's
        next step. ``ended``: the last output of a request the front door ended (for ``on_finish``)."""
        self._inbox.put(("abort", (request_id, index, ended), None))

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn(engine)`` in the engine thread between steps (for consistent snapshots)."""
        return await self._call("call", fn)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop, abort what is left (open streams end with EngineDead) and close the engine; waits
        up to ``timeout`` seconds (None: until the engine has closed)."""
        self._stopping.set()
        self._inbox.put(("stop", None, None))
        self._tokenize.close()
        self._thread.join(timeout)

    async def _call(self, kind: str, payload: Any) -> Any:
        if not self.alive:
            raise EngineDead("the engine is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((kind, payload, future))
        if self._drained.is_set():  # the engine stopped between the check and the put: no one else answers
            self._drain()
        return await asyncio.wrap_future(future)

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                # Block for work only while the engine is idle; otherwise take what has arrived and step.
                self._handle(self._inbox.get() if not self.engine.has_unfinished() else None)
                while not self._inbox.empty():
                    self._handle(self._inbox.get_nowait())
                if self._stopping.is_set() or not self.engine.has_unfinished():
                    continue
                steps = self.engine.num_steps
                outputs = self.engine.step()
                self._taken.clear()
                handed = self._deliver(outputs)  # first: the streams wait on nothing else
                if self.on_step is not None:
                    self.on_step(self.engine, outputs)
                if self.trace is not None and self.engine.num_steps > steps:  # a step ran (not all waited)
                    self.trace.step(self.engine.last_stats)
                if handed and self._wait_for_loop:
                    # With every core in the forward, the event loop's work on these deltas would run inside
                    # the next one: each op returning waits for the GIL and the other OpenMP thread idles at
                    # its barrier (a 32-stream decode step took 19-23 ms so, 15.5-16 ms after the loop).
                    self._taken.wait(HANDOFF_WAIT_S)
        except BaseException as err:  # a failed step: every open stream learns of it, health goes red
            logger.exception("engine loop failed")
            self.error = err
        finally:
            self._stopping.set()
            self._drained.set()  # before draining: a call put after the drain sees it and drains itself
            self._drain()
            self.engine.close()
            if self.trace is not None:
                self.trace.close()
            for loop, stream in list(self._streams.values()):
                with contextlib.suppress(RuntimeError):  # its event loop has closed: nobody reads it
                    loop.call_soon_threadsafe(stream.put_nowait, EngineDead("the engine stopped"))

    def _handle(self, message: tuple[str, Any, concurrent.futures.Future | None] | None) -> None:
        if message is None:
            return
        kind, payload, future = message
        # A caller that left (cancelled) before the engine took its call gets nothing done; once running, the
        # future can no longer be cancelled, so answering it below cannot raise in (and stop) this loop.
        if future is not None and not future.set_running_or_notify_cancel():
            return
        try:
            if kind == "add":
                waiting = self.engine.num_waiting
                if self.max_waiting is not None and waiting >= self.max_waiting:
                    raise EngineBusy(f"{waiting} requests are waiting (max_waiting={self.max_waiting})")
                prompt, params, request_id, detokenize, arrival = payload
                result = self.engine.add_request(
                    prompt, params, request_id, stream=True, detokenize=detokenize, arrival=arrival
                )
            elif kind == "abort":
                request_id, index, ended = payload
                result = self.engine.abort(request_id, index)
                if self.on_finish is not None and ended is not None:
                    self.on_finish(ended)
                if self.on_abort is not None and index is None:
                    self.on_abort(request_id)
            elif kind == "call":
                result = payload(self.engine)
            else:  # stop
                result = None
        except Exception as err:  # bad input, a full queue: that caller's error, never the loop's
            if not isinstance(err, (InputError, EngineBusy)):
                logger.exception("engine call %s failed", kind)
            if future is not None:
                future.set_exception(err)
            return
        if future is not None:
            future.set_result(result)

    def _deliver(self, outputs: list[RequestOutput]) -> bool:
        """Hand each output to its stream's event loop; True if any loop was handed some."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        handed = False
        for loop, items in by_loop.items():  # one wake-up of the event loop per step
            try:
                loop.call_soon_threadsafe(_put_all, items, self._taken)
                handed = True
            except RuntimeError:  # that event loop has closed: its readers are gone, so are their requests
                for _, out in items:
                    self._streams.pop(out.request_id, None)
                    self._handle(("abort", (out.request_id, None, None), None))
        return handed

    def _drain(self) -> None:
        """Fail calls still in the inbox (the engine is stopping); the engine thread and a late caller may
        both drain, so each message is taken by one of them."""
        while True:
            try:
                _, _, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if future is not None:
                future.set_exception(EngineDead("the engine stopped"))


class RequestStream:
    """Async iterator over one request's output deltas; ``abort()`` ends it early (no-op once finished)."""

    def __init__(self, llm: AsyncLLM, request_id: str, text: OutputText | None = None) -> None:
        self.llm = llm
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.text = text  # makes the outputs' text here, when the engine sends token ids only
        self.submitted: float | None = None  # handed to the engine thread (tokenized): the trace's split

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        while True:
            out = await self.queue.get()
            if isinstance(out, BaseException):
                self.finished = True
                self.llm._streams.pop(self.request_id, None)
                raise out
            engine_finished = out.finished
            if self.text is not None:
                out = self.text.fill(out)  # may end completions on a stop string
            if out.outputs or out.finished:
                break  # else it held only tokens past stop strings
        timeline = out.metrics.timeline
        if timeline is not None:
            timeline.delivered.append(now())
        if out.finished:
            self.finished = True
            self.llm._streams.pop(self.request_id, None)
            if not engine_finished:  # ended here on stop strings: the engine frees what it still runs
                self.llm.abort(self.request_id, ended=out)
            if timeline is not None and self.llm.trace is not None:
                self.llm.trace.request(self.request_id, timeline, submitted=self.submitted)
        else:
            for index in self.text.stopped if self.text is not None else ():
                self.llm.abort(self.request_id, index)
        return out

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.llm._streams.pop(self.request_id, None)
            self.llm.abort(self.request_id)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]], taken: threading.Event) -> None:
    for stream, out in items:
        stream.put_nowait(out)
    # The readers woken above run in the loop's next round, in order; this runs right after them.
    asyncio.get_running_loop().call_soon(taken.set)


def _no_spare_core(config: EngineConfig) -> bool:
    """The engine's forward runs on every core this process may use (no core left for the event loop)."""
    return config.device == "cpu" and config.num_threads >= available_cores()
