"""Stop strings are matched in AsyncLLM's front door, off the engine thread: the streamed outputs equal
LLM.generate's (the engine matching them itself), tokens the engine made past a stop are dropped, and
the stopped completions are aborted in the engine (their blocks come back)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from meshserve.engine import LLM, Engine, SamplingParams
from meshserve.engine.async_llm import AsyncLLM
from meshserve.engine.front_door import OutputText
from meshserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

ARGS = {"max_model_len": 96, "block_size": 4, "max_num_batched_tokens": 64}
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": None}
PROMPTS = ["the quick brown fox", "x = [1, 2, 3]\n" * 2]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def offline(model_dir) -> LLM:
    return LLM(model_dir, **ARGS)


def completions(out: RequestOutput) -> list[tuple]:
    return [(c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in out.outputs]


def stop_cases(offline: LLM, prompt: str) -> list[SamplingParams]:
    """Stop strings taken from the prompt's own free-running output, so they are met mid-stream."""
    greedy = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}
    free = offline.generate(prompt, SamplingParams(**greedy), use_tqdm=False)[0].text
    sampled = {"temperature": 1.0, "seed": 5, "n": 2, "max_tokens": 16, "ignore_eos": True}
    two = offline.generate(prompt, SamplingParams(**sampled), use_tqdm=False)[0].outputs
    return [
        SamplingParams(**greedy, stop=free[6:9]),
        SamplingParams(**greedy, stop=[free[6:9], free[10:12]], include_stop_str_in_output=True),
        SamplingParams(**greedy, stop=free[3:5], min_tokens=4, logprobs=2),
        SamplingParams(**sampled, stop=[two[0].text[5:7], two[1].text[8:10]], logprobs=1),
        SamplingParams(**sampled, stop=two[1].text[8:10], include_stop_str_in_output=True),
    ]


async def streamed(llm: AsyncLLM, prompt: str, params: SamplingParams) -> list[tuple]:
    """Each completion's deltas joined: (text, token ids, finish_reason, stop_reason, logprobs)."""
    parts: dict[int, list] = {}
    async for out in llm.generate(prompt, params):
        for c in out.outputs:
            text, ids, _, _, logprobs = parts.get(c.index, ["", [], None, None, None])
            if c.logprobs is not None:
                logprobs = (logprobs or []) + c.logprobs
            parts[c.index] = [text + c.text, ids + c.token_ids, c.finish_reason, c.stop_reason, logprobs]
    return [tuple(parts[i]) for i in sorted(parts)]


@pytest.mark.parametrize("speculative", [None, NGRAM], ids=["plain", "ngram"])
def test_stop_strings_stream_what_llm_generate_returns_without_the_engine_thread_decoding(
    model_dir, offline, monkeypatch, speculative
):
    cases = [(p, params) for p in PROMPTS for params in stop_cases(offline, p)]
    expected = [completions(offline.generate(p, params, use_tqdm=False)[0]) for p, params in cases]
    assert sum(any(isinstance(c[3], str) for c in e) for e in expected) >= len(cases) - 2  # most stop so
    for (_, params), e in zip(cases, expected, strict=True):  # the stop string is cut off, or kept
        stopped = [(text, stop) for text, _, _, stop, _ in e if isinstance(stop, str)]
        assert all(text.endswith(stop) == params.include_stop_str_in_output for text, stop in stopped)
    llm = AsyncLLM.from_args(model_dir, speculative_config=speculative, **ARGS)
    tok = llm.engine.tokenizer
    threads: set[str] = set()
    for name in ("decode", "detokenizer"):
        original = getattr(tok, name)

        def spy(*args, _original=original, **kwargs):
            threads.add(threading.current_thread().name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tok, name, spy)

    async def main() -> tuple[list, tuple]:
        got = await asyncio.gather(*(streamed(llm, p, params) for p, params in cases))
        await asyncio.sleep(0.2)  # the aborts reach the engine at its next loop
        left = await llm.call(lambda e: (len(e.groups), e.blocks.num_free_blocks, e.blocks.num_blocks))
        return got, left

    try:
        got, (groups, free, total) = asyncio.run(main())
    finally:
        llm.shutdown()
    for g, e in zip(got, expected, strict=True):
        assert [c[:4] for c in g] == [c[:4] for c in e]
        for gc, ec in zip(g, e, strict=True):  # logprobs: one per kept token, equal to float rounding
            assert (gc[4] is None) == (ec[4] is None)
            if ec[4] is not None:
                assert [list(d) for d in gc[4]] == [list(d) for d in ec[4]]
                flat = [v for d in ec[4] for v in d.values()]
                assert [v for d in gc[4] for v in d.values()] == pytest.approx(flat, abs=1e-5)
    assert threads and "meshserve-engine" not in threads
    assert groups == 0 and free == total  # every stopped completion was aborted and its blocks freed


def test_tokens_past_a_stop_string_are_dropped_and_the_completion_ends_there(offline):
    tok = offline.tokenizer
    ids = tok.encode(" alpha beta gamma delta epsilon")
    words = [tok.decode(ids[: k + 1]) for k in range(len(ids))]
    k = next(k for k, text in enumerate(words) if "gamma" in text)
    params = SamplingParams(n=2, stop="gamma", logprobs=0)
    text = OutputText(tok, params, eos_token_ids=[])
    running = [  # the engine ran completion 0 past the stop (a verify, or a step before the abort)
        CompletionOutput(0, "", ids, None, logprobs=[{t: -1.0} for t in ids]),
        CompletionOutput(1, "", ids[:1], None, logprobs=[{ids[0]: -1.0}]),
    ]
    out = text.fill(RequestOutput("r", None, [1], running, False, RequestMetrics(0.0, None, None)))
    first, second = out.outputs
    assert (first.token_ids, len(first.logprobs), first.finish_reason, first.stop_reason) == (
        ids[: k + 1],
        k + 1,
        "stop",
        "gamma",
    )
    assert first.text == words[k][: words[k].index("gamma")] and text.stopped == [0]
    assert not out.finished and second.finish_reason is None
    later = [CompletionOutput(0, "", [ids[0]], None), CompletionOutput(1, "", ids[1:2], "length")]
    out = text.fill(RequestOutput("r", None, [1], later, False, RequestMetrics(0.0, None, None)))
    assert [c.index for c in out.outputs] == [1] and out.finished  # both have ended, as the caller sees it


def test_aborting_one_completion_frees_its_blocks_and_the_others_run_on(model_dir):
    engine = Engine.from_args(model_dir, enable_prefix_caching=False, **ARGS)
    engine.add_request([1, 2, 3, 4, 5], SamplingParams(n=2, max_tokens=8, ignore_eos=True), "r")
    engine.step()
    used = engine.blocks.num_blocks - engine.blocks.num_free_blocks
    assert engine.abort("r", 0)
    assert engine.blocks.num_blocks - engine.blocks.num_free_blocks == used // 2
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    (out,) = outs
    assert [(c.index, len(c.token_ids), c.finish_reason) for c in out.outputs] == [
        (0, 1, "abort"),
        (1, 8, "length"),
    ]
    assert not engine.groups and engine.blocks.num_free_blocks == engine.blocks.num_blocks
