"""AsyncLLM's contract with its callers: every call is answered, with a result or EngineDead."""

from __future__ import annotations

import asyncio
import threading

import pytest

from meshserve.engine import SamplingParams
from meshserve.engine.async_llm import AsyncLLM, EngineDead


class LateInbox:
    """The inbox as a caller sees it when the engine dies between its ``alive`` check and its put: the
    put of a ``call`` first lets the engine's step fail and waits until the engine thread has ended."""

    def __init__(self, llm: AsyncLLM, fail_step: threading.Event) -> None:
        self.inbox, self.llm, self.fail_step = llm._inbox, llm, fail_step

    def put(self, message: tuple) -> None:
        if message[0] == "call":
            self.fail_step.set()
            self.llm._thread.join(10)
        self.inbox.put(message)

    def __getattr__(self, name: str):
        return getattr(self.inbox, name)


def test_a_call_put_after_the_engine_stopped_gets_engine_dead_not_a_hang(tiny_model_dir):
    llm = AsyncLLM.from_args(str(tiny_model_dir("llama")), max_model_len=64, block_size=4)
    fail_step = threading.Event()

    def failing_step():
        fail_step.wait(10)
        raise RuntimeError("step failed")

    llm.engine.step = failing_step

    async def main() -> None:
        await llm.add_request([1, 5, 6], SamplingParams(max_tokens=2))  # the engine thread enters the step
        llm._inbox = LateInbox(llm, fail_step)
        with pytest.raises(EngineDead):
            await asyncio.wait_for(llm.call(lambda engine: engine.num_steps), timeout=10)

    try:
        asyncio.run(main())
        assert isinstance(llm.error, RuntimeError) and not llm.alive
    finally:
        llm.shutdown()
