"""Offline profiling of Meta-Attention tile sizes on this machine (the tables `tile_sizes` reads).

`profile_attention(head_dim, num_heads, num_kv_heads, dtype, out_path)` times every candidate TileSizes on
synthetic mixed steps (a long prefill chunk beside decodes; a few long decodes beside many short ones),
keeps the fastest, and merges it into out_path under this machine's key (ISA / dtype / head_dim).
`meshserve profile` calls it; without a profile the shipped defaults in profiles/attention.json apply.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from meshserve.atomic import write_atomic
from meshserve.kernels import native
from meshserve.kernels.attention_tiles import TileSizes, plan_tasks, profile_key, user_profile_path
from meshserve.kernels.batch import BatchMetadata
from meshserve.kernels.meta_attention_native import meta_attention

PREFILL_ROWS = (8, 16, 32, 64, 128)
SHORT_ROWS = (8, 16)
MIN_SPLIT_KV = (128, 256, 1024)
BLOCK_SIZE = 16


def synthetic_step(context: list[int], q_lens: list[int]) -> tuple[BatchMetadata, int]:
    """Metadata of one step: sequence s has context[s] cached tokens and q_lens[s] new ones, in order."""
    seq_lens = torch.tensor([c + q for c, q in zip(context, q_lens, strict=True)])
    blocks = -(-seq_lens // BLOCK_SIZE)
    first = torch.cumsum(blocks, 0) - blocks
    width = int(blocks.max())
    col = torch.arange(width)[None, :]
    tables = torch.where(col < blocks[:, None], first[:, None] + col, 0)  # padded with 0, as the engine does
    q = torch.tensor(q_lens)
    seq_of = torch.repeat_interleave(torch.arange(len(q_lens)), q)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(q, 0)])
    pos = seq_lens[seq_of] - q[seq_of] + torch.arange(int(q.sum())) - starts[seq_of]
    meta = BatchMetadata(
        positions=pos,
        slot_mapping=tables[seq_of, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE,
        query_start_loc=starts.to(torch.int32),
        seq_lens=seq_lens.to(torch.int32),
        block_tables=tables.to(torch.int32),
        logits_indices=starts[1:] - 1,
    )
    return meta, int(blocks.sum())


STEPS = (([0] + [300] * 24, [256] + [1] * 24), ([2000, 1500] + [100] * 6, [1, 1] + [1] * 6))


def _time_ms(
    sizes: TileSizes, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, repeats: int
) -> float:
    total = 0.0
    for context, q_lens in STEPS:
        meta, blocks = synthetic_step(context, q_lens)
        cache = torch.randn(2, blocks, BLOCK_SIZE, kv_heads, head_dim).to(dtype)
        q = torch.randn(meta.num_tokens, heads, head_dim).to(dtype)
        k, v = (torch.randn(meta.num_tokens, kv_heads, head_dim).to(dtype) for _ in "kv")
        table = plan_tasks(meta, heads, kv_heads, sizes, torch.get_num_threads())
        meta_attention(q, k, v, cache, table, head_dim**-0.5)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            meta_attention(q, k, v, cache, table, head_dim**-0.5)
            best = min(best, time.perf_counter() - start)
        total += best * 1e3
    return total


def profile_attention(
    head_dim: int,
    num_heads: int,
    num_kv_heads: int,
    dtype: torch.dtype,
    out_path: str | Path | None = None,
    repeats: int = 3,
) -> TileSizes:
    """Measure candidate tile sizes here; write the fastest into out_path (default: user_profile_path())."""
    if not native.load():
        raise RuntimeError(f"native kernels are not built here; run `{native.BUILD_COMMAND}` first")
    candidates = [TileSizes(p, s, m) for p, s, m in itertools.product(PREFILL_ROWS, SHORT_ROWS, MIN_SPLIT_KV)]
    timed = {
        c: _time_ms(c, num_heads, num_kv_heads, head_dim, dtype, repeats)
        for c in tqdm(candidates, desc=f"attention tiles d={head_dim} {dtype}", unit="candidate")
    }
    best = min(timed, key=timed.get)
    path = Path(out_path) if out_path else user_profile_path()
    profile = json.loads(path.read_text()) if path.exists() else {}
    profile.setdefault("entries", {})[profile_key(head_dim, dtype)] = {
        "prefill_rows": best.prefill_rows,
        "short_rows": best.short_rows,
        "min_split_kv": best.min_split_kv,
    }
    write_atomic(path, (json.dumps(profile, indent=2) + "\n").encode())
    return best
