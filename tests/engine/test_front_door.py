"""AsyncLLM's front door: prompts are tokenized and streamed tokens detokenized off the engine thread,
with the same text the engine would have made."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from meshserve.engine import LLM, PoolingParams, SamplingParams
from meshserve.engine.async_llm import AsyncLLM
from meshserve.engine.front_door import INLINE_CHARS
from meshserve.errors import InputError

ARGS = {"max_model_len": 96, "block_size": 4, "max_num_batched_tokens": 64}
PROMPTS = ["the quick brown fox", "x = [1, 2, 3]\n" * 2]


async def collect(llm: AsyncLLM, prompt, params) -> tuple[list[str], list[float]]:
    """Each completion's streamed text, and when each delta arrived."""
    texts, times = [""] * getattr(params, "n", 1), []
    stream = await llm.add_request(prompt, params)
    async for out in stream:
        times.append(time.perf_counter())
        for c in out.outputs:
            texts[c.index] += c.text
    return texts, times


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


def test_streamed_text_is_the_engines_and_made_off_its_thread(model_dir, monkeypatch):
    offline = LLM(model_dir, **ARGS)
    eos = offline.engine.model_config.eos_token_ids[0]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    free = offline.generate(PROMPTS[0], greedy, use_tqdm=False)[0]
    cases = [  # (params, what ends it): length; a stop token id (not in the text); n = 2 sampled
        greedy,
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[free.token_ids[4]], ignore_eos=True),
        SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=10, stop_token_ids=[eos]),
    ]
    expected = [
        [c.text for c in offline.generate(p, params, use_tqdm=False)[0].outputs]
        for p in PROMPTS
        for params in cases
    ]
    llm = AsyncLLM.from_args(model_dir, **ARGS)
    tok = llm.engine.tokenizer
    threads: set[str] = set()
    for name in ("encode", "decode"):
        original = getattr(tok, name)

        def spy(*args, _original=original, **kwargs):
            threads.add(threading.current_thread().name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tok, name, spy)

    async def main() -> list[list[str]]:
        runs = [collect(llm, p, params) for p in PROMPTS for params in cases]
        return [texts for texts, _ in await asyncio.gather(*runs)]

    try:
        assert asyncio.run(main()) == expected
        assert expected[1][0] == free.text[: len(expected[1][0])] and len(expected[1][0]) < len(free.text)
        assert threads and "meshserve-engine" not in threads
    finally:
        llm.shutdown()


def test_a_long_prompt_tokenizes_in_the_pool_while_other_streams_run(model_dir, monkeypatch):
    """A prompt over INLINE_CHARS is tokenized in the front door's pool: a slow tokenization (a stand-in
    for a very long prompt) holds neither the event loop nor the engine thread, so a short request sent
    after it is served to the end meanwhile; then the long prompt is refused (too long)."""
    llm = AsyncLLM.from_args(model_dir, **ARGS)
    tok = llm.engine.tokenizer
    encode, slow_s = tok.encode, 3.0

    def slow_encode(text, *args, **kwargs):
        if len(text) > INLINE_CHARS:
            time.sleep(slow_s)  # sleeps without the GIL, as the Rust tokenizer's encode_batch runs
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tok, "encode", slow_encode)

    async def main() -> None:
        long = asyncio.create_task(llm.add_request("word " * INLINE_CHARS, SamplingParams(max_tokens=4)))
        await asyncio.sleep(0.05)  # it is tokenizing
        texts, times = await collect(llm, PROMPTS[0], SamplingParams(max_tokens=8, ignore_eos=True))
        assert len(times) >= 2 and texts[0] and not long.done()
        with pytest.raises(InputError, match="prompt: .* too long"):
            await long

    try:
        asyncio.run(main())
    finally:
        llm.shutdown()


def test_embeddings_through_async_llm_equal_llm_embed(model_dir):
    offline = LLM(model_dir, **ARGS)
    (want,) = offline.embed([PROMPTS[0]], PoolingParams("MEAN"), use_tqdm=False)
    llm = AsyncLLM.from_args(model_dir, **ARGS)

    async def main():
        async for out in await llm.add_request(PROMPTS[0], PoolingParams("MEAN")):
            return out

    try:
        out = asyncio.run(main())
        assert out.finished and out.embedding.tolist() == want.embedding.tolist()
    finally:
        llm.shutdown()
