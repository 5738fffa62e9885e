"""A request's timeline: phase times in order, one time per token, written to a trace file when served."""

from __future__ import annotations

import asyncio
import json

from meshserve.bench.phases import breakdown, read_trace
from meshserve.engine import Engine, SamplingParams
from meshserve.engine.async_llm import AsyncLLM

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_the_engine_records_each_phase_in_order_and_a_time_per_token(tiny_model_dir):
    engine = Engine.from_args(
        str(tiny_model_dir("llama")), max_model_len=64, block_size=4, max_num_batched_tokens=8
    )
    first = engine.add_request([1] + list(range(20, 40)), PARAMS)  # 21 prompt tokens: 3 prefill chunks
    second = engine.add_request([1, 5, 6], PARAMS)
    requests = {rid: engine.requests[rid] for rid in (first, second)}
    while engine.has_unfinished():
        engine.step()
    for request in requests.values():
        t = request.timeline
        assert t.arrival <= t.queued <= t.scheduled <= t.first_token <= t.finished
        assert len(t.token_times) == 6 and t.token_times == sorted(t.token_times)
        assert set(t.phases()) == {"front", "queue", "prefill", "decode", "e2e", "inference", "ttft"}
    # the long prompt is chunked over steps, so its prefill spans several; the short one waits for budget
    assert requests[first].timeline.phases()["prefill"] > 0
    assert requests[second].timeline.scheduled > requests[first].timeline.scheduled


def test_a_served_run_writes_steps_and_requests_that_the_breakdown_reads(tiny_model_dir, tmp_path):
    path = tmp_path / "trace.jsonl"
    llm = AsyncLLM.from_args(
        str(tiny_model_dir("llama")), max_model_len=64, block_size=4, trace_file=str(path)
    )

    async def one(prompt: list[int]) -> int:
        deltas = [out async for out in llm.generate(prompt, PARAMS)]
        return sum(len(out.token_ids) for out in deltas)

    async def main() -> list[int]:
        return await asyncio.gather(one([1, 5, 6]), one([1, 7, 8, 9]))

    try:
        assert asyncio.run(main()) == [6, 6]
    finally:
        llm.shutdown()
    steps, requests = read_trace(path)
    assert len(requests) == 2 and len(steps) == llm.engine.num_steps
    assert all(json.loads(line) for line in path.read_text().splitlines())
    for r in requests:
        assert len(r["token_times"]) == 6 and r["arrival"] <= r["queued"] <= r["scheduled"]
        assert r["delivered"][0] >= r["token_times"][0]  # the event loop gets a delta after its step
    parts = breakdown(steps, requests)
    # the parts add up to the totals they split
    ttft = sum(parts[k] for k in ("front", "queue", "prefill", "deliver"))
    tpot = sum(parts[k] for k in ("compute_decode", "compute_mixed", "outputs", "loop"))
    assert abs(ttft - parts["ttft"]).max() < 1e-9 and abs(tpot - parts["tpot"]).max() < 1e-9


def test_a_request_arriving_between_steps_starts_its_prefill_in_the_next_step(tiny_model_dir):
    engine = Engine.from_args(
        str(tiny_model_dir("llama")), max_model_len=64, block_size=4, max_num_batched_tokens=32
    )
    for prompt in ([1, 5, 6], [1, 7, 8], [1, 9, 10]):
        engine.add_request(prompt, PARAMS)
    engine.step()  # their prompts; from now on they decode
    late = engine.add_request([1] + list(range(20, 40)), PARAMS)
    before = engine.num_steps
    engine.step()
    request = engine.requests[late]
    assert engine.last_stats["tokens"] == {"prefill": 21, "decode": 3, "verify": 0}  # beside the decodes
    assert request.timeline.scheduled is not None and len(request.timeline.token_times) == 1
    assert engine.num_steps == before + 1
