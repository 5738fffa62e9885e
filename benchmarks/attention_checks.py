"""Time of the native Meta-Attention op on a decode batch and a long prefill (bfloat16, 8 KV heads x 4).

    flock /tmp/meshserve-heavy.lock .venv/bin/python benchmarks/attention_checks.py

The op bounds-checks its Task-Table and block tables in one serial pass before it runs
(kernels/csrc/task_table_checks.h); run this with PYTHONPATH at a checkout without the checks to see what
they cost on the same batches.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from meshserve.engine.runner import batch_metadata
from meshserve.kernels import native
from meshserve.kernels.attention_tiles import plan_tasks, tile_sizes
from meshserve.kernels.meta_attention_native import meta_attention

BS, KV_HEADS, HEADS, DIM = 16, 8, 32, 128


def time_op(start: list[int], n: list[int], repeats: int) -> float:
    """Fastest ms of one op call (the least disturbed by other work on the machine) for sequences with
    ``start`` cached tokens appending ``n`` each."""
    blocks = [-(-(s + k) // BS) for s, k in zip(start, n, strict=True)]
    ids = np.random.default_rng(0).permutation(sum(blocks)).tolist()
    tables = [[ids.pop() for _ in range(b)] for b in blocks]
    meta = batch_metadata(np.array(start), np.array(n), np.ones(len(n), dtype=np.int64), tables, BS)
    cache = torch.randn(2, sum(blocks), BS, KV_HEADS, DIM).to(torch.bfloat16)
    q, k, v = (torch.randn(meta.num_tokens, h, DIM).to(torch.bfloat16) for h in (HEADS, KV_HEADS, KV_HEADS))
    table = plan_tasks(meta, HEADS, KV_HEADS, tile_sizes(DIM, torch.bfloat16), torch.get_num_threads())
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        meta_attention(q, k, v, cache, table, DIM**-0.5)
        times.append(time.perf_counter() - begin)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert native.load(), f"build the native kernels first: {native.BUILD_COMMAND}"
    decode = time_op([2048] * 32, [1] * 32, args.repeats)
    short = time_op([128] * 64, [1] * 64, args.repeats)
    prefill = time_op([0], [2048], max(3, args.repeats // 10))
    print(
        f"decode 32 x 2048 ctx: {decode:.3f} ms; decode 64 x 128 ctx: {short:.3f} ms; "
        f"prefill 2048: {prefill:.2f} ms (fastest of the repeats; {args.threads} threads)"
    )


if __name__ == "__main__":
    main()
