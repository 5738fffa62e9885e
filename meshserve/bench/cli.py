"""``meshserve bench serve``: the serving benchmark client (HTTP only: it measures any OpenAI server);
``meshserve bench phases``: a served run's TTFT and TPOT phases from its timeline file."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import typer

from meshserve.atomic import atomic_path
from meshserve.bench.datasets import (
    DATASETS,
    prefix_repetition_requests,
    random_requests,
    sharegpt_requests,
)
from meshserve.bench.phases import breakdown, format_breakdown, read_trace, within
from meshserve.bench.serve import format_summary, parse_goodput, run_benchmark, summarize
from meshserve.errors import InputError, require

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)


@app.command("serve")
def bench_serve(
    base_url: str = typer.Option("http://127.0.0.1:8000", help="Server root (…/v1 is added)."),
    model: str = typer.Option(..., help="Model name the server serves."),
    dataset: str = typer.Option("random", help="random, prefix-repetition or sharegpt-file."),
    dataset_path: str | None = typer.Option(None, help="ShareGPT JSON file (for sharegpt-file)."),
    num_prompts: int = typer.Option(64, help="Requests to send."),
    request_rate: float = typer.Option(float("inf"), help="Requests per second (inf = all at once)."),
    burstiness: float = typer.Option(1.0, help="Gamma shape of arrivals: 1 = Poisson, < 1 burstier."),
    max_concurrency: int | None = typer.Option(None, help="Most requests in flight at once."),
    random_input_len: int = typer.Option(256, help="Prompt tokens (random)."),
    random_output_len: int = typer.Option(64, help="Output tokens (random, prefix-repetition)."),
    prefix_len: int = typer.Option(192, help="Shared prefix tokens (prefix-repetition)."),
    suffix_len: int = typer.Option(64, help="Own suffix tokens (prefix-repetition)."),
    num_prefixes: int = typer.Option(4, help="Distinct prefixes (prefix-repetition)."),
    sharegpt_output_len: int | None = typer.Option(None, help="Output tokens (sharegpt; default: reply)."),
    vocab_size: int = typer.Option(256, help="Synthetic prompts use token ids 3 .. vocab_size - 1."),
    goodput: list[str] | None = typer.Option(None, help="SLO as METRIC:MS (ttft, tpot, e2el); repeatable."),
    save_result: str | None = typer.Option(None, help="Write the summary JSON here."),
    seed: int = typer.Option(0, help="Seed for prompts and arrival times."),
) -> None:
    """Benchmark a running server and print vLLM's serving table."""
    require(dataset in DATASETS, "dataset", f"must be one of {', '.join(DATASETS)}, got {dataset!r}")
    require(num_prompts >= 1, "num_prompts", f"must be >= 1, got {num_prompts}")
    require(vocab_size > 3, "vocab_size", f"must be > 3, got {vocab_size}")
    slos = parse_goodput(goodput)
    rng = np.random.default_rng(seed)
    if dataset == "random":
        requests = random_requests(num_prompts, random_input_len, random_output_len, vocab_size, rng)
    elif dataset == "prefix-repetition":
        requests = prefix_repetition_requests(
            num_prompts, prefix_len, suffix_len, num_prefixes, random_output_len, vocab_size, rng
        )
    else:
        if dataset_path is None:
            raise InputError("dataset_path", "sharegpt-file needs --dataset-path FILE")
        requests = sharegpt_requests(dataset_path, num_prompts, sharegpt_output_len, rng)
    results, duration = asyncio.run(
        run_benchmark(base_url, model, requests, request_rate, burstiness, max_concurrency, seed)
    )
    summary = summarize(results, duration, slos)
    summary.update(
        dataset=dataset,
        num_prompts=num_prompts,
        request_rate=request_rate,
        burstiness=burstiness,
        model_id=model,
        base_url=base_url,
    )
    print(format_summary(summary, f"Serving Benchmark Result ({dataset}, rate {request_rate:g})"))
    if save_result:
        with atomic_path(save_result) as tmp:
            tmp.write_text(json.dumps(summary, indent=2, default=str))


def parse_window(text: str) -> tuple[float, float]:
    """``"START:END"`` (seconds) -> (start, end)."""
    try:
        start, end = (float(x) for x in text.split(":"))
    except ValueError:
        raise InputError("window", f"expected START:END seconds, got {text!r}") from None
    require(start <= end, "window", f"START must be <= END, got {text!r}")
    return start, end


@app.command("phases")
def bench_phases(
    trace_file: str = typer.Argument(..., help="A timeline file from `meshserve serve --trace-file`."),
    title: str = typer.Option("", help="Heading of the table."),
    window: list[str] | None = typer.Option(
        None, help="START:END monotonic seconds: only steps and arrivals inside; repeatable."
    ),
) -> None:
    """Split a served run's TTFT and TPOT into phases (queue, prefill, decode steps, loop, delivery)."""
    steps, requests = read_trace(trace_file)
    if window:
        steps, requests = within(steps, requests, [parse_window(w) for w in window])
    require(bool(requests), "trace_file", f"{trace_file} holds no finished request")
    print(format_breakdown(breakdown(steps, requests), title))
