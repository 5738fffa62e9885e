"""A client that hangs up in every phase of its request (queued, mid-prefill, mid-decode), streaming or not,
n = 1 or 2: the server answers 499 (non-streaming; 200 once a stream's headers are out), aborts every
completion, forgets the request and frees every KV block.

The app is driven as ASGI, as uvicorn drives it, so the status the server chose is seen even though the
client has gone. The phase is watched in the engine thread at every step's end (PhaseGate), which then
holds the engine until the app has handled the disconnect: the hang-up lands in the wanted phase however
late the event loop runs. (A poll from the event loop, as this once did, missed the 8-step prefill on a
loaded machine.)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable

import pytest

from meshserve import SamplingParams
from meshserve.engine.async_llm import AsyncLLM
from meshserve.engine.engine import Engine
from meshserve.engine.request import Request, RequestStatus
from meshserve.server.app import build_app

PROMPT = [1] + [(11 * j) % 400 + 3 for j in range(59)]  # 60 tokens: 8 prefill steps at 8 tokens a step
STEP_S = 0.01  # each step sleeps this long: a queued request's blockers outlast its hop to the engine
HOLD_S = 20.0  # the longest the gate holds the engine (a test that never releases it still ends)


class PhaseGate:
    """Watches the engine at the end of every step (engine thread); the first time ``armed`` holds for it,
    keeps that request, sets ``reached`` and holds the engine until ``release()``."""

    def __init__(self) -> None:
        self.armed: Callable[[Engine], Request | None] | None = None
        self.request: Request | None = None
        self.reached = threading.Event()
        self._released = threading.Event()

    def arm(self, find: Callable[[Engine], Request | None]) -> None:
        self.request, self.armed = None, find
        self.reached.clear()
        self._released.clear()

    def after_step(self, engine: Engine) -> None:
        find = self.armed
        if find is None or (request := find(engine)) is None:
            return
        self.armed, self.request = None, request
        self.reached.set()
        self._released.wait(HOLD_S)

    def release(self) -> None:
        self.armed = None
        self._released.set()


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    llm = AsyncLLM.from_args(
        str(tiny_model_dir("llama")), max_model_len=96, max_num_seqs=2, max_num_batched_tokens=8, block_size=4
    )
    step, gate = llm.engine.step, PhaseGate()

    def gated_step():
        time.sleep(STEP_S)
        outputs = step()
        gate.after_step(llm.engine)
        return outputs

    llm.engine.step = gated_step
    yield llm, build_app(llm, "tiny"), gate
    gate.release()
    llm.shutdown()


def _ours(engine: Engine) -> Request | None:
    """The first completion of the request the test sent (the server names it cmpl-...), or None."""
    groups = [g for rid, g in engine.groups.items() if rid.startswith("cmpl-")]
    return groups[0].children[0] if groups else None


PHASES = {
    "queued": lambda r: r.status is RequestStatus.WAITING and r.num_computed_tokens == 0,
    "prefill": lambda r: (
        r.status is RequestStatus.RUNNING and 0 < r.num_computed_tokens < r.num_prompt_tokens
    ),
    "decode": lambda r: r.status is RequestStatus.RUNNING and r.num_output_tokens >= 2,
}


def _clean(engine: Engine) -> bool:
    blocks = engine.blocks
    return not engine.groups and not engine.requests and blocks.num_free_blocks == blocks.num_blocks


async def _hang_up_in(app, gate: PhaseGate, body: dict, phase: str) -> tuple[int, Request | None]:
    """POST ``body`` to /v1/completions and disconnect once the request is in ``phase`` (the engine held
    there until the app has returned); returns the status the server sent and the completion caught in
    the phase (None if it never got there)."""
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
    body_sent, statuses = [False], []

    def find(engine: Engine) -> Request | None:
        ours = _ours(engine)
        return ours if ours is not None and PHASES[phase](ours) else None

    async def receive() -> dict:
        if not body_sent[0]:
            body_sent[0] = True
            return {"type": "http.request", "body": data, "more_body": False}
        await asyncio.to_thread(gate.reached.wait, HOLD_S)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    gate.arm(find)
    try:
        await asyncio.wait_for(app(scope, receive, send), timeout=30)
    finally:
        gate.release()  # the abort the app queued is taken before the engine's next step
    return statuses[0], gate.request


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("phase", list(PHASES))
def test_hang_up_in_every_phase(served, phase, stream, n):
    llm, app, gate = served
    body = {"prompt": PROMPT, "max_tokens": 30, "n": n, "stream": stream, "ignore_eos": True, "seed": 1}

    async def main() -> None:
        blockers = []
        if phase == "queued":  # max_num_seqs requests that outlast the test's: it waits behind them
            greedy = SamplingParams(temperature=0, max_tokens=90, ignore_eos=True)
            blockers = [await llm.add_request([1, 5 + i], greedy, f"blocker-{i}") for i in range(2)]
        try:
            status, caught = await _hang_up_in(app, gate, body, phase)
        finally:
            for blocker in blockers:
                blocker.abort()
        assert caught is not None, f"the request never reached the {phase} phase"
        assert status == (200 if stream else 499)
        deadline = time.time() + 10
        while not await llm.call(_clean):
            assert time.time() < deadline, "the request is still in the engine or holds blocks"
            await asyncio.sleep(0.01)
        # aborted where it was caught, not run to its end
        assert caught.status is RequestStatus.FINISHED_ABORTED and caught.num_output_tokens < 30
        assert app.state.metrics.num_tracked == 0

    asyncio.run(main())
