"""``meshserve bench serve``: load-test any OpenAI-compatible server over HTTP, reporting as vLLM's
serving benchmark does (same metric names and JSON keys, so results compare side by side).

Requests arrive as a Poisson process at ``request_rate`` (a gamma process with ``burstiness`` != 1;
``inf`` sends all at once) and stream from /v1/completions. Per request: TTFT (first chunk),
ITL (gaps between later chunks), TPOT ((latency - TTFT) / (output tokens - 1)) and E2EL.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from tqdm.auto import tqdm

from meshserve.bench.datasets import BenchRequest
from meshserve.errors import InputError, require

GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> SLOs in ms per metric."""
    slos = {}
    for item in items or []:
        name, _, value = item.partition(":")
        require(
            name in GOODPUT_METRICS,
            "goodput",
            f"metric must be one of {', '.join(GOODPUT_METRICS)}, got {item!r}",
        )
        try:
            slos[name] = float(value)
        except ValueError:
            raise InputError("goodput", f"expected METRIC:MILLISECONDS, got {item!r}") from None
    return slos


async def _one(client: httpx.AsyncClient, url: str, model: str, request: BenchRequest) -> RequestResult:
    body = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult(prompt_len=request.prompt_len)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_len = chunk["usage"]["prompt_tokens"]
                if chunk.get("choices"):  # one chunk per step with new tokens, as vLLM's client counts them
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.success = result.ttft > 0
        if not result.success:
            result.error = "nothing streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        result.error = f"{type(err).__name__}: {err}"
    return result


def arrival_gaps(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds before each request: gamma(shape=burstiness, mean=1/rate); all zero for an infinite rate."""
    if math.isinf(rate):
        return np.zeros(n)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


async def run_benchmark(
    base_url: str,
    model: str,
    requests: list[BenchRequest],
    request_rate: float,
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """Send ``requests`` at the given rate; returns each one's result and the benchmark's duration."""
    require(request_rate > 0, "request_rate", f"must be > 0 (inf = all at once), got {request_rate}")
    require(burstiness > 0, "burstiness", f"must be > 0, got {burstiness}")
    url = base_url.rstrip("/") + "/v1/completions"
    gaps = arrival_gaps(len(requests), request_rate, burstiness, np.random.default_rng(seed))
    limit = asyncio.Semaphore(max_concurrency or len(requests) or 1)
    bar = tqdm(total=len(requests), desc="bench serve", unit="req", disable=not progress)
    connections = httpx.Limits(max_connections=max_concurrency or 1000, max_keepalive_connections=64)

    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=connections) as client:

        async def send(request: BenchRequest) -> RequestResult:
            async with limit:
                result = await _one(client, url, model, request)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for request, gap in zip(requests, gaps, strict=True):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(send(request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


def summarize(
    results: list[RequestResult],
    duration: float,
    goodput: dict[str, float] | None = None,
) -> dict[str, Any]:
    """vLLM's benchmark_serving keys: counts, throughputs, and mean/median/std/p99 of each latency (ms)."""
    ok = [r for r in results if r.success]
    out_tokens = [r.output_tokens for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": tpot,
        "itl": [g for r in ok for g in r.itl],
        "e2el": [r.latency for r in ok],
    }
    summary: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": sum(r.prompt_len for r in ok),
        "total_output_tokens": sum(out_tokens),
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": sum(out_tokens) / duration if duration else 0.0,
        "total_token_throughput": (sum(out_tokens) + sum(r.prompt_len for r in ok)) / duration
        if duration
        else 0.0,
    }
    if goodput:
        good = sum(all(_metric(r, m) * 1000 <= slo for m, slo in goodput.items()) for r in ok)
        summary["request_goodput"] = good / duration if duration else 0.0
    for name, values in series.items():
        ms = np.asarray(values, dtype=float) * 1000
        for stat, fn in (("mean", np.mean), ("median", np.median), ("std", np.std)):
            summary[f"{stat}_{name}_ms"] = float(fn(ms)) if len(ms) else 0.0
        summary[f"p99_{name}_ms"] = float(np.percentile(ms, 99)) if len(ms) else 0.0
    summary["errors"] = sorted({r.error for r in results if r.error})[:5]
    return summary


def _metric(result: RequestResult, name: str) -> float:
    if name == "ttft":
        return result.ttft
    if name == "e2el":
        return result.latency
    return (result.latency - result.ttft) / max(1, result.output_tokens - 1)


def format_summary(summary: dict[str, Any], title: str) -> str:
    """The table vLLM prints, from a ``summarize`` dict."""
    lines = [
        f"{f' {title} ':=^60}",
        f"{'Successful requests:':<40}{summary['completed']:>20}",
        f"{'Failed requests:':<40}{summary['failed']:>20}",
        f"{'Benchmark duration (s):':<40}{summary['duration']:>20.2f}",
        f"{'Total input tokens:':<40}{summary['total_input_tokens']:>20}",
        f"{'Total generated tokens:':<40}{summary['total_output_tokens']:>20}",
        f"{'Request throughput (req/s):':<40}{summary['request_throughput']:>20.2f}",
        f"{'Output token throughput (tok/s):':<40}{summary['output_throughput']:>20.2f}",
        f"{'Total token throughput (tok/s):':<40}{summary['total_token_throughput']:>20.2f}",
    ]
    if "request_goodput" in summary:
        lines.append(f"{'Request goodput (req/s):':<40}{summary['request_goodput']:>20.2f}")
    for name, label in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st token)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        lines.append(f"{f' {label} ':-^60}")
        for stat in ("mean", "median", "p99"):
            lines.append(
                f"{f'{stat.capitalize()} {name.upper()} (ms):':<40}{summary[f'{stat}_{name}_ms']:>20.2f}"
            )
    return "\n".join(lines)
