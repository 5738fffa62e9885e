"""A client that hangs up in every phase of its request (queued, mid-prefill, mid-decode), streaming or not,
n = 1 or 2: the server answers 499 (non-streaming; 200 once a stream's headers are out), aborts every
completion, forgets the request and frees every KV block.

The app is driven as ASGI, as uvicorn drives it, so the status the server chose is seen even though the
client has gone; the disconnect is sent once the engine (read between steps) is in the wanted phase.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from meshserve import SamplingParams
from meshserve.engine.async_llm import AsyncLLM
from meshserve.engine.engine import Engine
from meshserve.engine.request import RequestStatus
from meshserve.server.app import build_app

PROMPT = [1] + [(11 * j) % 400 + 3 for j in range(59)]  # 60 tokens: 8 prefill steps at 8 tokens a step
STEP_S = 0.01  # each step sleeps this long, so every phase lasts several polls


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    llm = AsyncLLM.from_args(
        str(tiny_model_dir("llama")), max_model_len=96, max_num_seqs=2, max_num_batched_tokens=8, block_size=4
    )
    step = llm.engine.step

    def slow_step():
        time.sleep(STEP_S)
        return step()

    llm.engine.step = slow_step
    yield llm, build_app(llm, "tiny")
    llm.shutdown()


def _ours(engine: Engine):
    """The first completion of the request the test sent (the server names it cmpl-...), or None."""
    groups = [g for rid, g in engine.groups.items() if rid.startswith("cmpl-")]
    return groups[0].children[0] if groups else None


PHASES = {
    "queued": lambda r: r.status is RequestStatus.WAITING and r.num_computed_tokens == 0,
    "prefill": lambda r: (
        r.status is RequestStatus.RUNNING and 0 < r.num_computed_tokens < r.num_prompt_tokens
    ),
    "decode": lambda r: r.num_output_tokens >= 2,
}


def _clean(engine: Engine) -> bool:
    blocks = engine.blocks
    return not engine.groups and not engine.requests and blocks.num_free_blocks == blocks.num_blocks


async def _hang_up_in(llm: AsyncLLM, app, body: dict, phase: str) -> tuple[int, bool]:
    """POST ``body`` to /v1/completions and disconnect once the request is in ``phase``; returns the
    status the server sent and whether the phase was reached."""
    data = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # what uvicorn announces
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    reached, body_sent, statuses = [False], [False], []

    def in_phase(engine: Engine) -> bool:
        ours = _ours(engine)
        return ours is not None and PHASES[phase](ours)

    async def receive() -> dict:
        if not body_sent[0]:
            body_sent[0] = True
            return {"type": "http.request", "body": data, "more_body": False}
        deadline = time.time() + 20
        while not reached[0] and time.time() < deadline:
            reached[0] = await llm.call(in_phase)
            await asyncio.sleep(0.002)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    return statuses[0], reached[0]


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("phase", list(PHASES))
def test_hang_up_in_every_phase(served, phase, stream, n):
    llm, app = served
    body = {"prompt": PROMPT, "max_tokens": 30, "n": n, "stream": stream, "ignore_eos": True, "seed": 1}

    async def main() -> None:
        blockers = []
        if phase == "queued":  # max_num_seqs requests that outlast the test's: it waits behind them
            greedy = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
            blockers = [await llm.add_request([1, 5 + i], greedy, f"blocker-{i}") for i in range(2)]
        try:
            status, reached = await _hang_up_in(llm, app, body, phase)
        finally:
            for blocker in blockers:
                blocker.abort()
        assert reached, f"the request never reached the {phase} phase"
        assert status == (200 if stream else 499)
        deadline = time.time() + 10
        while not await llm.call(_clean):
            assert time.time() < deadline, "the request is still in the engine or holds blocks"
            await asyncio.sleep(0.01)
        assert app.state.metrics.num_tracked == 0

    asyncio.run(main())
