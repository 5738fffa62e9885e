"""Soak: 2,000 streamed requests through the real HTTP server, a random third of them hung up on mid-stream.

Checks what a long-running server must keep: every KV block free and no per-request state left once the
last client is gone (engine requests and groups, AsyncLLM streams, metrics timing entries), Python objects
not growing with requests, and resident memory on a plateau. Exits 1 when any fails.

RSS rises while the first few hundred requests meet new step shapes (the heap reaches the peak working set;
oneDNN and ideep cache a primitive per GEMM shape, up to 1,024 each, where a layer runs them at the step's
exact token count), so it is read every ``--every`` requests and judged over the run's second half only:
a leak keeps growing there, a plateau does not. Object counts are taken with the server idle after the
warm-up and at the end. The server runs in this process (a background thread); the client is
``--concurrency`` workers, so its own memory does not grow with the number of requests.

    .venv/bin/python benchmarks/soak.py [--requests 2000] [--warmup 500] [--concurrency 64] [--every 100]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from meshserve.engine.async_llm import AsyncLLM
from meshserve.engine.engine import Engine
from meshserve.memory import pin_malloc_thresholds, rss_mib
from meshserve.server.serve import ServerThread, free_port
from meshserve.testing import make_tiny_model

MAX_TAIL_GROWTH = 0.02  # RSS growth allowed over the second half of the run


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


async def soak(
    url: str, n: int, concurrency: int, rng: random.Random, every: int, bar: tqdm
) -> tuple[int, list[tuple[int, float]]]:
    """``n`` requests from ``concurrency`` workers; returns how many were hung up on and (requests done,
    RSS MiB) every ``every`` requests."""
    left, done, aborted = n, 0, 0
    samples: list[tuple[int, float]] = []

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal left, done, aborted
        while left > 0:
            left -= 1
            hung_up = await one(client, url, rng)  # (not `aborted += await ...`: that reads it before)
            aborted += hung_up
            done += 1
            if done % every == 0:
                samples.append((done, rss_mib()))
            bar.update(1)

    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return aborted, samples


def request_state(server: ServerThread) -> dict[str, int]:
    """Per-request entries still held once every client has gone (each should be 0): the engine's, read
    between steps, and uvicorn's connections and request tasks (it closes them once the client has)."""
    llm, served = server.llm, server.server.server_state
    metrics = llm.on_step.__self__  # the app's ServerMetrics

    def read(engine: Engine) -> dict[str, int]:
        return {
            "engine requests": len(engine.requests),
            "engine groups": len(engine.groups),
            "handoffs": len(engine.handoffs),
            "streams": len(llm._streams),
            "metrics entries": metrics.num_tracked,
            "KV blocks held": engine.blocks.num_blocks - engine.blocks.num_free_blocks,
            "connections": len(served.connections),
            "request tasks": len(served.tasks),
        }

    deadline = time.time() + 30
    while True:  # aborts of hung-up requests land between steps, connections close: wait for both
        state = asyncio.run(llm.call(read))
        if not any(state.values()) or time.time() > deadline:
            return state
        time.sleep(0.05)


def object_counts() -> Counter[str]:
    gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="all requests, the warm-up's included")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=500, help="requests before the first object count")
    parser.add_argument("--every", type=int, default=100, help="requests between RSS readings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pin_malloc_thresholds()  # as `meshserve serve` does
    rng = random.Random(args.seed)
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
        rss_start = rss_mib()
        bar = tqdm(total=args.requests, desc="soak", unit="req")
        start = time.perf_counter()
        aborted, _ = asyncio.run(soak(server.url, args.warmup, args.concurrency, rng, args.every, bar))
        request_state(server)
        objects_warm, rss_warm = object_counts(), rss_mib()
        rest, samples = asyncio.run(
            soak(server.url, args.requests - args.warmup, args.concurrency, rng, args.every, bar)
        )
        elapsed = time.perf_counter() - start
        bar.close()
        state = request_state(server)
        objects_end, rss_end = object_counts(), rss_mib()
        server.stop()
    aborted += rest
    samples = [(args.warmup + k, rss) for k, rss in samples]
    mid_done, rss_mid = samples[(len(samples) - 1) // 2] if samples else (args.warmup, rss_warm)
    tail = (rss_end - rss_mid) / rss_mid
    grown = objects_end - objects_warm
    max_objects = (args.requests - args.warmup) // 2  # a record kept per request would pass this
    print(
        f"{args.requests} requests ({aborted} hung up mid-stream) in {elapsed:.1f} s, concurrency "
        f"{args.concurrency}"
    )
    print("held after the run: " + ", ".join(f"{k} {v}" for k, v in state.items()))
    print(
        f"Python objects: {objects_warm.total()} after {args.warmup} requests (idle), "
        f"{objects_end.total()} at the end ({objects_end.total() - objects_warm.total():+d}); "
        f"grew most: {grown.most_common(5)}"
    )
    print("RSS MiB by requests done: " + ", ".join(f"{k}: {rss:.1f}" for k, rss in samples))
    print(
        f"RSS {rss_start:.1f} MiB at start, {rss_warm:.1f} after the {args.warmup}-request warm-up, "
        f"{rss_mid:.1f} after {mid_done}, {rss_end:.1f} at the end: {tail:+.1%} over the second half "
        f"(limit {MAX_TAIL_GROWTH:+.0%}), {(rss_end - rss_warm) / rss_warm:+.1%} since the warm-up"
    )
    ok = not any(state.values()) and sum(grown.values()) < max_objects and abs(tail) <= MAX_TAIL_GROWTH
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
