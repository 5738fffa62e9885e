"""How long a very large prompt's tokenization holds up other streams, on the engine thread vs the front door.

    flock /tmp/bench.lock .venv/bin/python benchmarks/front_door.py [--model DIR] [--chars N]

A stream decodes on the shipped tiny-moe model while a prompt of N characters (default: the longest the
engine accepts before tokenizing, which is then refused as too many tokens: the worst a client can send)
is tokenized either where the engine used to tokenize (``engine thread``: the old path, run through
AsyncLLM.call) or by AsyncLLM's front door (a pool thread; ``encode`` releases the GIL). It prints the
tokenization time alone and the stream's longest gap between two tokens while the prompt tokenized.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from meshserve.engine import SamplingParams
from meshserve.engine.async_llm import AsyncLLM
from meshserve.errors import InputError

MODEL = Path(__file__).resolve().parents[1] / "meshserve/assets/models/tiny-moe"
LINE = "    result = compute(value, offset=3)  # a line of code\n"


async def longest_gap(llm: AsyncLLM, text: str, where: str) -> tuple[float, float]:
    """(seconds the tokenization took, the decoding stream's longest gap between tokens meanwhile)."""
    stream = await llm.add_request("def main():\n", SamplingParams(max_tokens=400, ignore_eos=True))
    arrivals: list[float] = []

    async def drain() -> None:
        async for _ in stream:
            arrivals.append(time.perf_counter())

    reading = asyncio.create_task(drain())
    while len(arrivals) < 20:  # decoding at a steady pace
        await asyncio.sleep(0.01)
    start = time.perf_counter()
    try:
        if where == "engine thread":
            await llm.call(lambda engine: engine.tokenizer.encode(text))
        else:
            await llm.add_request(text, SamplingParams(max_tokens=1))
    except InputError:
        pass  # too many tokens: refused after tokenizing, as a too-long prompt is
    end = time.perf_counter()
    await asyncio.sleep(0.2)
    stream.abort()
    reading.cancel()
    spans = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if b > start and a < end]
    return end - start, max(spans, default=end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--chars", type=int, default=None, help="prompt length (default: the engine's bound)")
    args = parser.parse_args()
    llm = AsyncLLM.from_args(args.model, max_num_seqs=4)
    chars = args.chars or llm.engine.tokenizer.max_chars
    text = (LINE * (chars // len(LINE) + 1))[:chars]
    try:
        begin = time.perf_counter()
        llm.engine.tokenizer.encode(text)  # alone, no limit check: the tokenizer's own time
        print(f"prompt: {chars:,} characters, tokenized alone in {time.perf_counter() - begin:.3f} s")
        for where in ("engine thread", "front door"):
            took, gap = asyncio.run(longest_gap(llm, text, where))
            print(f"{where:>13}: tokenizing took {took:.3f} s; the stream's longest gap then {gap:.3f} s")
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main()
