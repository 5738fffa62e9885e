"""Decode attention at DeepSeek-V3's MLA shape through the native Meta-Attention op.

128 query heads over one latent row per token (kv_lora_rank 512 + rope 64 = 576 wide, bfloat16, a one-part
paged cache), beside a yardstick: the same maths as two float32 torch matmuls per sequence over contiguous
rows (no paging). Then one prefill chunk through MLA's two forms (models/layers/mla.py): absorbed (the op
over 576-wide latent rows) against expanded (kv_b_proj per head, 192-wide scores). Prints milliseconds per
layer call. Run: `python benchmarks/mla_attention.py`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from meshserve.engine.runner import batch_metadata
from meshserve.kernels import native
from meshserve.kernels.attention_tiles import plan_tasks_native, tile_sizes
from meshserve.kernels.meta_attention_native import meta_attention
from meshserve.models.config import ModelConfig
from meshserve.models.layers.attention import StepInputs
from meshserve.models.layers.mla import LatentAttention, MLAConfig

HEADS, WIDTH, BLOCK = 128, 576, 16
LATENT, ROPE, NOPE, V = 512, 64, 128, 128  # DeepSeek-V3's MLA


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def measure(seqs: int, context: int, threads: int, repeats: int) -> tuple[float, float]:
    """(native op, yardstick) milliseconds for `seqs` decodes over `context` cached tokens each."""
    gen = torch.Generator().manual_seed(0)
    per_seq = -(-(context + 1) // BLOCK)
    tables = np.random.default_rng(0).permutation(seqs * per_seq).reshape(seqs, per_seq).tolist()
    ones = np.ones(seqs, dtype=np.int64)
    meta = batch_metadata(np.full(seqs, context), ones, ones, tables, BLOCK)
    cache = torch.randn(1, seqs * per_seq, BLOCK, 1, WIDTH, generator=gen).bfloat16()
    q = torch.randn(seqs, HEADS, WIDTH, generator=gen).bfloat16()
    k = torch.randn(seqs, 1, WIDTH, generator=gen).bfloat16()
    table = plan_tasks_native(meta, HEADS, 1, tile_sizes(WIDTH, torch.bfloat16), threads)
    scale = WIDTH**-0.5
    rows, qf = torch.randn(seqs, context + 1, WIDTH, generator=gen), q.float()

    def yardstick() -> None:
        for s in range(seqs):
            torch.softmax(qf[s] @ rows[s].T * scale, -1) @ rows[s]

    op = best_ms(lambda: meta_attention(q, k, k, cache, table, scale), repeats)
    return op, best_ms(yardstick, repeats)


def measure_prefill(tokens: int, threads: int, repeats: int) -> tuple[float, float]:
    """(absorbed, expanded) milliseconds of MLA attention for one fresh prompt chunk of `tokens` rows: from
    the projected query and latent rows to the per-head outputs (the projections around it are shared)."""
    mla = MLAConfig(None, LATENT, NOPE, ROPE, V, True, (NOPE + ROPE) ** -0.5)
    cfg = ModelConfig(
        "bench", "DeepseekV3ForCausalLM", 8, 64, 1, HEADS, 1, WIDTH, 4096, 1, [2], torch.bfloat16
    )
    cfg.mla = mla
    layer = LatentAttention(cfg).bfloat16()
    gen = torch.Generator().manual_seed(0)
    layer.kv_b_proj.weight.data = (torch.randn(HEADS * (NOPE + V), LATENT, generator=gen) * 0.05).bfloat16()
    per_seq = -(-tokens // BLOCK)
    one = np.ones(1, dtype=np.int64)
    meta = batch_metadata(np.zeros(1, dtype=np.int64), np.array([tokens]), one, [list(range(per_seq))], BLOCK)
    cache = torch.zeros(1, per_seq, BLOCK, 1, WIDTH, dtype=torch.bfloat16)
    table = plan_tasks_native(meta, HEADS, 1, tile_sizes(WIDTH, torch.bfloat16), threads)
    step = StepInputs(torch.empty(0), torch.empty(0), {None: table}, None, meta)
    q = torch.randn(tokens, HEADS, NOPE + ROPE, generator=gen).bfloat16()
    key = torch.randn(tokens, WIDTH, generator=gen).bfloat16()
    absorbed = best_ms(lambda: layer._absorbed(q[..., :NOPE], q[..., NOPE:], key, cache, step), repeats)
    return absorbed, best_ms(lambda: layer._expanded(q, key, cache, meta), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--seqs", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--prefill", type=int, nargs="*", default=[512], help="prompt chunk rows")
    args = parser.parse_args()
    if not native.load():
        raise SystemExit(f"native kernels missing: run `{native.BUILD_COMMAND}`")
    torch.set_num_threads(args.threads)
    for seqs in args.seqs:
        op, ref = measure(seqs, args.context, args.threads, args.repeats)
        print(
            f"context {args.context}, {seqs} decode(s), {args.threads} threads: native op {op:.2f} ms, "
            f"torch float32 matmuls {ref:.2f} ms"
        )
    for tokens in args.prefill:
        absorbed, expanded = measure_prefill(tokens, args.threads, max(3, args.repeats // 4))
        print(
            f"prefill of {tokens} rows, {HEADS} heads, {args.threads} threads: absorbed {absorbed:.1f} ms, "
            f"expanded {expanded:.1f} ms ({absorbed / expanded:.2f}x)"
        )


if __name__ == "__main__":
    main()
