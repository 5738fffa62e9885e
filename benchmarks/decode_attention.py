"""Per-layer time of the native Meta-Attention op on pure decode batches of the 28M Llama (bfloat16, 8 heads,
4 KV heads, head_dim 64, block size 16), each layer with its own KV cache as in the engine (so a layer's KV
is as cold as a real decode step leaves it), the block tables shuffled as a long-running cache leaves them.

    flock /tmp/bench.lock .venv/bin/python benchmarks/decode_attention.py [--batches 32x290 1x290 64x512]

Prints, per batch: the op's median ms per layer over --repeats steps of all layers (KV write included, the
planning once per step excluded), the same for an empty Task-Table (the op's fixed cost: dispatch, checks,
output allocation, the parallel region), and the achieved rates (useful FLOPs, KV bytes read).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from meshserve.engine.runner import batch_metadata
from meshserve.kernels import native
from meshserve.kernels.attention_tiles import plan_tasks_native, tile_sizes
from meshserve.kernels.meta_attention_native import meta_attention

BS, HEADS, KV_HEADS, DIM, LAYERS = 16, 8, 4, 64, 8


def step_times(seqs: int, ctx: int, repeats: int, empty: bool) -> list[float]:
    """ms per layer of each of `repeats` steps (all LAYERS layers, one op each) of `seqs` decodes at `ctx`."""
    blocks = -(-ctx // BS)
    ids = np.random.default_rng(0).permutation(seqs * blocks).tolist()
    tables = [[ids.pop() for _ in range(blocks)] for _ in range(seqs)]
    start, n = np.full(seqs, ctx - 1), np.ones(seqs, dtype=np.int64)
    meta = batch_metadata(start, n, np.ones(seqs, dtype=np.int64), tables, BS)
    caches = [torch.randn(2, seqs * blocks, BS, KV_HEADS, DIM).to(torch.bfloat16) for _ in range(LAYERS)]
    q, k, v = (torch.randn(seqs, h, DIM).to(torch.bfloat16) for h in (HEADS, KV_HEADS, KV_HEADS))
    table = plan_tasks_native(meta, HEADS, KV_HEADS, tile_sizes(DIM, torch.bfloat16), torch.get_num_threads())
    if empty:
        table.tasks, table.thread_starts = table.tasks[:0], torch.zeros_like(table.thread_starts)
        table.combine, table.partial_rows = table.combine[:0], 0
    times = []
    for _ in range(repeats + 1):  # the first step warms up
        begin = time.perf_counter()
        for cache in caches:
            meta_attention(q, k, v, cache, table, DIM**-0.5)
        times.append((time.perf_counter() - begin) * 1e3 / LAYERS)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", default=["32x290", "1x290", "64x512"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert native.load(), f"build the native kernels first: {native.BUILD_COMMAND}"
    for batch in args.batches:
        seqs, ctx = (int(x) for x in batch.split("x"))
        ms = statistics.median(step_times(seqs, ctx, args.repeats, empty=False))
        fixed = statistics.median(step_times(seqs, ctx, args.repeats, empty=True))
        flops = 4.0 * DIM * HEADS * seqs * ctx
        kv_bytes = 2.0 * 2 * DIM * KV_HEADS * seqs * ctx
        print(
            f"{seqs:3d} x {ctx:4d} ctx: {ms * 1e3:7.1f} us/layer (empty table {fixed * 1e3:5.1f} us), "
            f"{flops / ms / 1e6:6.1f} GFLOP/s, {kv_bytes / ms / 1e6:5.1f} GB/s KV "
            f"({args.threads} threads, median of {args.repeats} steps x {LAYERS} layers)"
        )


if __name__ == "__main__":
    main()
