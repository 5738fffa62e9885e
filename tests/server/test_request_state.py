"""Requests leave nothing behind: once every client has gone (a third hung up mid-stream), no object made per
request is still alive anywhere in the process, and uvicorn holds no connection or request task.

Counted as objects (gc), not dict entries or RSS, so a record kept anywhere (a list of finished
timelines, a stream map entry, a closure in a callback) fails it; benchmarks/soak.py checks the same
over thousands of requests.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections import Counter

import httpx

from meshserve.engine.async_llm import RequestStream
from meshserve.engine.front_door import OutputText
from meshserve.engine.groups import RequestGroup
from meshserve.engine.outputs import CompletionOutput, RequestOutput
from meshserve.engine.request import Request
from meshserve.engine.stop import StopStrings
from meshserve.engine.timeline import Timeline
from meshserve.server.serve import ServerThread
from tests.server.conftest import start_server

PER_REQUEST = {
    Request,
    RequestGroup,
    RequestStream,
    OutputText,
    StopStrings,
    Timeline,
    RequestOutput,
    CompletionOutput,
}


def _alive() -> Counter[str]:
    gc.collect()
    # type(), not isinstance: that reads __class__, which some module proxies answer with a warning
    return Counter(t.__name__ for t in map(type, gc.get_objects()) if t in PER_REQUEST)


async def _requests(url: str, count: int, seed: int) -> None:
    rng = random.Random(seed)

    async def one(client: httpx.AsyncClient) -> None:
        body = {
            "prompt": [1] + [rng.randrange(3, 500) for _ in range(rng.randrange(2, 40))],
            "max_tokens": rng.randrange(1, 12),
            "n": rng.choice([1, 1, 2]),
            "stop": ["a"] if rng.random() < 0.3 else None,  # the front door's stop-string text too
            "stream": True,
            "ignore_eos": True,
        }
        leave_after = rng.choice([None, None, 0, 2])
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            chunks = 0
            async for line in response.aiter_lines():
                chunks += line.startswith("data: {")
                if leave_after is not None and chunks > leave_after:
                    return  # hang up mid-stream

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(one(client) for _ in range(count)))


def _settled(running: ServerThread) -> None:
    """One last request alone, then wait until the engine has no request and uvicorn no connection or
    request task. (The engine thread keeps its last step's outputs until it steps again: ending on the
    same request makes those the same objects' kind and number at every count.)"""
    body = {"prompt": [1, 5], "max_tokens": 1}
    assert httpx.post(f"{running.url}/v1/completions", json=body, timeout=60).status_code == 200
    engine, served = running.llm.engine, running.server.server_state
    deadline = time.time() + 20
    while engine.requests or engine.groups or served.connections or served.tasks:
        assert time.time() < deadline, "requests or connections still held after every client left"
        time.sleep(0.02)


def test_no_per_request_object_outlives_its_request(model_dir):
    running = start_server(model_dir)
    try:
        asyncio.run(_requests(running.url, 20, seed=0))  # warm: lazily made state is not per request
        _settled(running)
        before = _alive()
        asyncio.run(_requests(running.url, 60, seed=1))
        _settled(running)
        assert _alive() - before == Counter()
    finally:
        running.stop()
