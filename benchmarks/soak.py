"""Soak: 1,000 streamed requests through the real HTTP server, a random third of them hung up on mid-stream.

Checks what a long-running server must keep: every KV block free once the last client is gone, and
resident memory flat (within 5% between the end of a warm-up and the end of the run). Prints both
and exits 1 when either fails. The server runs in this process (a background thread), so RSS is the
server's plus the client's, which is small and constant.

    .venv/bin/python benchmarks/soak.py [--requests 1000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from meshserve.engine.async_llm import AsyncLLM
from meshserve.memory import pin_malloc_thresholds, rss_mib
from meshserve.server.serve import ServerThread, free_port
from meshserve.testing import make_tiny_model


async def one(client: httpx.AsyncClient, url: str, rng: random.Random) -> bool:
    """One streamed completion; True if it was hung up on early."""
    body = {
        "prompt": [1] + [rng.randrange(3, 500) for _ in range(rng.randrange(4, 120))],
        "stream": True,
        "max_tokens": rng.randrange(1, 64),
        "temperature": rng.choice([0.0, 0.8]),
        "ignore_eos": True,
        "n": rng.choice([1, 1, 1, 2]),
    }
    hang_up_after = rng.randrange(0, 8) if rng.random() < 1 / 3 else None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        chunks = 0
        async for line in response.aiter_lines():
            chunks += line.startswith("data: {")
            if hang_up_after is not None and chunks > hang_up_after:
                return True
    return False


async def soak(url: str, n: int, concurrency: int, seed: int, warmup: int) -> tuple[int, float]:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    rss_after_warmup = float("nan")
    done = 0
    aborted = 0
    bar = tqdm(total=n, desc="soak", unit="req")

    async def run(client: httpx.AsyncClient) -> None:
        nonlocal done, aborted, rss_after_warmup
        async with gate:
            hung_up = await one(client, url, rng)
        aborted += hung_up
        done += 1
        if done == warmup:
            rss_after_warmup = rss_mib()
        bar.update(1)

    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        await asyncio.gather(*(run(client) for _ in range(n)))
    bar.close()
    return aborted, rss_after_warmup


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=200, help="requests before the first RSS reading")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pin_malloc_thresholds()  # as `meshserve serve` does
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(
            Path(tmp) / "llama",
            arch="llama",
            hidden_size=256,
            num_hidden_layers=4,
            intermediate_size=704,
            vocab_size=512,
        )
        llm = AsyncLLM.from_args(str(model), max_model_len=256, max_num_seqs=32, max_num_batched_tokens=512)
        server = ServerThread(llm, "soak", free_port())
        start = time.perf_counter()
        aborted, rss_warm = asyncio.run(
            soak(server.url, args.requests, args.concurrency, args.seed, args.warmup)
        )
        elapsed = time.perf_counter() - start
        deadline = time.time() + 30
        blocks = llm.engine.blocks
        while (
            blocks.num_free_blocks != blocks.num_blocks or llm.engine.has_unfinished()
        ) and time.time() < deadline:
            time.sleep(0.05)
        rss_end = rss_mib()
        leaked = blocks.num_blocks - blocks.num_free_blocks
        server.stop()
    growth = (rss_end - rss_warm) / rss_warm
    print(
        f"{args.requests} requests ({aborted} hung up mid-stream) in {elapsed:.1f} s, concurrency "
        f"{args.concurrency}"
    )
    print(f"KV blocks still held after the run: {leaked} of {blocks.num_blocks}")
    print(
        f"RSS after {args.warmup} requests {rss_warm:.1f} MiB, at the end {rss_end:.1f} MiB ({growth:+.1%})"
    )
    ok = leaked == 0 and abs(growth) <= 0.05
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
