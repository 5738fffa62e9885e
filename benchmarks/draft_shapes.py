"""Batch-1 cost of the lean draft forward (engine/spec/draft_runner.py) for candidate draft shapes.

    flock /tmp/meshserve-bench.lock .venv/bin/python benchmarks/draft_shapes.py [--repeats 5] [--threads 2]
        [--dtype float32]

A draft's forward at batch 1 is mostly fixed overhead, so a wider or deeper draft may cost little more
per proposal while following its target better. Random weights (the cost does not depend on them), the
shipped tokenizer's vocabulary (4,096) and tied embeddings. Per shape: parameters and the median ms of a
1-token decode forward and of a 2-token catch-up forward at position ~100, over --repeats rounds of 200
calls; shapes alternate within each round, so they see the same machine noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from meshserve.engine.spec.draft_runner import DraftRunner
from meshserve.models import load_model
from meshserve.testing import make_tiny_model

# (hidden, layers, heads, kv_heads, mlp): head_dim 32 as the shipped draft's; the first is the shipped one.
SHAPES = [
    (96, 2, 3, 1, 256),
    (192, 2, 6, 2, 512),
    (256, 2, 8, 2, 768),
    (256, 3, 8, 2, 768),
    (320, 2, 10, 2, 896),
    (384, 2, 12, 2, 1024),
]


def runner_for(shape: tuple[int, ...], root: Path, dtype: str) -> tuple[DraftRunner, int]:
    hidden, layers, heads, kv_heads, mlp = shape
    path = make_tiny_model(
        root / "x".join(map(str, shape)),
        "llama",
        vocab_size=4096,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=mlp,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        dtype=dtype,
    )
    model = load_model(path, dtype).model
    return DraftRunner(model, max_len=512, slots=1), sum(p.numel() for p in model.parameters())


def time_forward(runner: DraftRunner, width: int, calls: int) -> float:
    """Median-free mean ms per forward of `width` tokens at positions 100.. of slot 0."""
    slots, starts = torch.zeros(1, dtype=torch.long), torch.full((1,), 100)
    ids, lens = torch.full((1, width), 7), torch.full((1,), width)
    start = time.perf_counter()
    for _ in range(calls):
        runner.forward(slots, starts, ids, lens)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        runners = {shape: runner_for(shape, Path(tmp), args.dtype) for shape in SHAPES}
    times: dict[tuple, dict[int, list[float]]] = {s: {1: [], 2: []} for s in SHAPES}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for shape, (runner, _) in runners.items():
            for width in (1, 2):
                times[shape][width].append(time_forward(runner, width, args.calls))
    base = statistics.median(times[SHAPES[0]][1][1:])
    print(f"lean draft forward at batch 1, {args.dtype}, {args.threads} threads, median of {args.repeats}")
    print(f"{'hidden/layers/heads/kv/mlp':<28} {'params':>8} {'1 tok ms':>9} {'2 tok ms':>9} {'vs first':>9}")
    for shape, (_, params) in runners.items():
        one, two = (statistics.median(times[shape][w][1:]) for w in (1, 2))
        name = "/".join(map(str, shape))
        print(f"{name:<28} {params / 1e6:7.2f}M {one:9.3f} {two:9.3f} {one / base:8.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
