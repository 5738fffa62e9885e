"""AsyncLLM's contract with its callers: every call is answered, with a result or EngineDead."""

from __future__ import annotations

import asyncio
import random
import threading
import time

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


@pytest.mark.parametrize("engine_took_it", [False, True], ids=["before the engine took it", "after"])
def test_a_caller_that_leaves_while_its_add_is_queued_runs_nothing_for_it(tiny_model_dir, engine_took_it):
    """A client that hangs up between queueing its request and hearing back: the engine keeps serving, and
    the request does not run to the end for a reader that is gone."""
    llm = AsyncLLM.from_args(str(tiny_model_dir("llama")), max_model_len=128, block_size=4)
    real_call, engine_busy = llm._call, threading.Event()

    async def call_and_hang_up(kind, payload):
        if kind != "add":
            return await real_call(kind, payload)
        if not engine_took_it:  # hold the engine thread so the add waits in the inbox
            llm._inbox.put(("call", lambda engine: engine_busy.wait(10), None))
        queued = asyncio.ensure_future(real_call(kind, payload))
        await asyncio.sleep(0)  # the add is in the inbox now
        while engine_took_it and "left" not in llm.engine.groups:
            time.sleep(0.001)  # blocking: this loop does not hear the engine's answer before the hang-up
        queued.cancel()
        engine_busy.set()
        return await queued

    llm._call = call_and_hang_up

    async def main() -> bool:
        with pytest.raises(asyncio.CancelledError):
            await llm.add_request([1, 5, 6], SamplingParams(max_tokens=100, ignore_eos=True), "left")
        llm._call = real_call
        # the inbox is FIFO: this snapshot is taken after the add and whatever the hang-up sent
        return await asyncio.wait_for(llm.call(lambda engine: "left" in engine.groups), timeout=10)

    try:
        assert asyncio.run(main()) is False
        assert llm.alive and "left" not in llm._streams
    finally:
        llm.shutdown()


def test_a_stream_whose_event_loop_closed_is_aborted_and_the_engine_keeps_serving(tiny_model_dir):
    llm = AsyncLLM.from_args(str(tiny_model_dir("llama")), max_model_len=1024, block_size=4)

    async def start_and_walk_away() -> None:
        await llm.add_request([1, 5, 6], SamplingParams(max_tokens=1000, ignore_eos=True), "orphan")

    async def snapshot() -> tuple[bool, int]:
        await asyncio.sleep(0.2)  # a few steps deliver to the closed loop
        return await llm.call(lambda engine: ("orphan" in engine.groups, engine.blocks.num_free_blocks))

    try:
        asyncio.run(start_and_walk_away())  # closes its loop with the stream unread
        running, free = asyncio.run(snapshot())
        assert llm.alive and not running and free == llm.engine.blocks.num_blocks
    finally:
        llm.shutdown()


@pytest.mark.parametrize("seed", range(3))
def test_callers_cancelled_at_random_moments_leave_nothing_behind(tiny_model_dir, seed):
    """Fuzz: clients that give up at any point (tokenizing, queueing, mid-stream, never) never stop the
    engine, and once all are gone no request and no KV block is left."""
    llm = AsyncLLM.from_args(str(tiny_model_dir("llama")), max_model_len=128, block_size=4)
    rng = random.Random(seed)

    async def client(i: int) -> None:
        async for _ in llm.generate([1, 5 + i % 50, 6], SamplingParams(max_tokens=rng.randint(1, 40))):
            pass

    async def main() -> tuple[int, int]:
        tasks = [asyncio.ensure_future(client(i)) for i in range(60)]
        for task in tasks:
            await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.002]))
            if rng.random() < 0.6:
                task.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=60)
        return await asyncio.wait_for(
            llm.call(lambda engine: (len(engine.groups), engine.blocks.num_free_blocks)), timeout=10
        )

    try:
        left, free = asyncio.run(main())
        assert llm.alive and left == 0 and free == llm.engine.blocks.num_blocks and not llm._streams
    finally:
        llm.shutdown()


def test_with_no_spare_core_the_engine_steps_again_only_after_the_loop_took_the_outputs(tiny_model_dir):
    """Every core in the forward: the event loop's work on a step's deltas runs between steps, not inside
    the next forward (where it would slow every op), so no step ends while a reader holds the loop."""
    llm = AsyncLLM.from_args(str(tiny_model_dir("llama")), max_model_len=128, block_size=4)
    llm._wait_for_loop = True  # as on a machine whose cores all run the forward

    async def main() -> list[tuple[int, int]]:
        seen = []
        async for _ in llm.generate([1, 5, 6], SamplingParams(max_tokens=6, ignore_eos=True)):
            before = llm.engine.num_steps
            time.sleep(0.008)  # the loop's own work on a delta (SSE, text), far longer than a tiny step
            seen.append((before, llm.engine.num_steps))
        return seen

    try:
        seen = asyncio.run(main())
        assert len(seen) == 6 and all(before == after for before, after in seen), seen
    finally:
        llm.shutdown()


def test_a_stuck_event_loop_holds_the_engine_back_for_at_most_the_handoff_wait(tiny_model_dir):
    llm = AsyncLLM.from_args(str(tiny_model_dir("llama")), max_model_len=256, block_size=4)
    llm._wait_for_loop = True

    async def main() -> int:
        await llm.add_request([1, 5, 6], SamplingParams(max_tokens=100, ignore_eos=True))
        start = llm.engine.num_steps
        time.sleep(0.5)  # the loop takes nothing: each step's wait ends at HANDOFF_WAIT_S
        return llm.engine.num_steps - start

    try:
        steps = asyncio.run(main())
        assert steps >= 5, steps  # 0.5 s / 0.02 s = 25 at most; a wait without its bound would allow 0
    finally:
        llm.shutdown()


def test_shutdown_with_a_stream_whose_event_loop_closed_ends_the_engine_thread_cleanly(tiny_model_dir):
    """A stream left open when its event loop closed: the engine thread tells the others EngineDead and
    closes the engine; the closed loop's stream is skipped, not an exception that skips the rest."""
    llm = AsyncLLM.from_args(str(tiny_model_dir("llama")), max_model_len=256, block_size=4)
    failures: list[BaseException] = []
    hook, threading.excepthook = threading.excepthook, lambda args: failures.append(args.exc_value)
    gate = threading.Event()
    llm.engine.step = lambda: gate.wait(10) and []  # no output reaches the stream before the loop closes

    async def main() -> None:
        await llm.add_request([1, 5, 6], SamplingParams(max_tokens=200, ignore_eos=True))

    try:
        asyncio.run(main())  # the loop closes with the request still streaming
        llm._stopping.set()
        gate.set()
        llm.shutdown()
        assert not llm._thread.is_alive() and not failures, failures
    finally:
        threading.excepthook = hook
        llm.shutdown()
