"""Kernel benchmarks: Meta-Attention on mixed prefill/decode/verify batches recorded from real engine steps,
SmoothGEMM over M = 1..budget, the fused MoE block over token counts 1..512 (benchmarks/moe_block.py) and
the fused elementwise ops vs their torch references (benchmarks/fused_ops.py).

    flock /tmp/meshserve-bench.lock .venv/bin/python benchmarks/kernels.py [--steps 4] [--repeats 5]
        [--dtypes float32 bfloat16] [--threads 1 2]
        [--sections attention attention-roofline gemm bf16gemm moe fused]
    flock /tmp/meshserve-bench.lock .venv/bin/python benchmarks/kernels.py --sections gemm-roofline \
        --dtypes bfloat16 --threads 2 --repeats 3 [--archs mixtral llama]

attention-roofline section (benchmarks/attention_roofline.py): each attention stage's FLOPs, bytes and
achieved rates against this box's measured FMA and read-bandwidth peaks, and the 2-thread Task-Table split.

GEMM section: each linear layer of the 28M Llama over a sweep of M values from 1 to the budget (512):
F.linear on the exact M; pad-to-bucket (zero rows up to vLLM's capture sizes, what graph-capture engines
run); SmoothGEMM as the engine runs it (the GEMM table it would load here: this machine's profile or the
shipped default). XY-Serve reports SmoothGEMM +14.6% over its baseline GEMM; printed beside ours.
bf16gemm section (benchmarks/bf16_gemm.py): each bfloat16 kernel SmoothGEMM can pick, side by side over M.
gemm-roofline section (benchmarks/gemm_roofline.py, not in the default set: it runs the race's workload
once per model): each GEMM and the MoE op at the M values the race's engine steps really produce, FLOPs,
bytes, GFLOP/s and GB/s against this box's roofs, share of the run's wall time.

The batches come from the standard workload (benchmarks/throughput.py: 64 requests, prompts 32-512,
28M Llama shapes: 8 heads, 4 KV heads, head_dim 64, block size 16): the engine runs it and the metadata of
a few mixed steps (chunks beside decodes) spread over the run is kept. For each step, one layer's
attention (KV write included) runs as

- meta-attention: the native op over the Task-Table (planning cost counted once per step, 1/layers share),
- reference: meshserve's torch reference (gather KV per tile group, masked batched softmax),
- sdpa-loop: one `scaled_dot_product_attention` per sequence over its KV gathered from the cache,
- sdpa-padded: one SDPA over all sequences padded to the longest query and KV (boolean mask),

reporting the median of --repeats interleaved runs. XY-Serve reports Meta-Attention +21.5% over its
baseline attention; that anchor is printed beside our speed-up over the faster SDPA baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bf16_gemm import bf16_gemm_section
from fused_ops import fused_section
from gemm_roofline import roofline_section as gemm_roofline_section
from moe_block import moe_section
from throughput import LLAMA, standard_workload

from meshserve.engine import LLM, SamplingParams
from meshserve.kernels import native
from meshserve.kernels.attention_tiles import TaskTable, TileSizes, plan_tasks, tile_sizes
from meshserve.kernels.meta_attention import paged_attention, plan_attention, write_kv
from meshserve.kernels.meta_attention_native import meta_attention
from meshserve.kernels.profile import GemmTable, load_gemm_table, shape_key
from meshserve.kernels.smooth_gemm import SmoothLinear, pad_to_bucket_linear
from meshserve.models.batch import BatchMetadata
from meshserve.testing import make_tiny_model

PAPER_ATTENTION_GAIN = 0.215  # XY-Serve sec. 7: Meta-Attention vs its baseline attention
PAPER_GEMM_GAIN = 0.146  # XY-Serve sec. 7: SmoothGEMM vs its baseline GEMM library
HEADS, KV_HEADS, HEAD_DIM = LLAMA["num_attention_heads"], LLAMA["num_key_value_heads"], 64
LAYERS = LLAMA["num_hidden_layers"]


def record_steps(num_steps: int, budget: int = 512) -> tuple[list[BatchMetadata], int, int]:
    """Run the standard workload through the engine; keep `num_steps` steps' metadata spread over the run.

    Returns the metadata, the KV cache's block count and block size.
    """
    recorded: list[BatchMetadata] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(Path(tmp) / "llama", "llama", **LLAMA)
        llm = LLM(
            str(path), dtype="float32", max_num_batched_tokens=budget, max_num_seqs=64, kv_cache_memory=1.0
        )
        llm.engine.model.register_forward_pre_hook(lambda _m, args: recorded.append(args[1]))
        prompts, outputs = standard_workload()
        params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in outputs]
        llm.generate(prompts, params, use_tqdm=True)
        blocks, block_size = llm.engine.kv_caches[0].shape[1:3]
        llm.close()
    # Mixed steps (prefill chunks beside decodes) first: they are what Meta-Attention unifies.
    mixed = [m for m in recorded if _is_mixed(m)] or recorded
    picks = torch.linspace(0, len(mixed) - 1, num_steps + 2).round().long()[1:-1].tolist()
    return [mixed[i] for i in picks], int(blocks), int(block_size)


def _is_mixed(meta: BatchMetadata) -> bool:
    q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
    return bool((q_lens == 1).any() and (q_lens > 1).any())


def describe(meta: BatchMetadata) -> str:
    q_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()
    decodes = int((q_lens == 1).sum())
    chunks = int((q_lens > 1).sum())
    longest = int(meta.seq_lens.max())
    return f"{meta.num_tokens:4d} tokens: {decodes:2d} decodes, {chunks:2d} chunks, KV <= {longest}"


def _slots(meta: BatchMetadata, s: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(int(meta.seq_lens[s]), device=meta.block_tables.device)
    return meta.block_tables[s].long()[pos // block_size] * block_size + pos % block_size


def sdpa_loop(q, k, v, cache, meta: BatchMetadata, block_size: int) -> torch.Tensor:
    """One SDPA per sequence over its KV gathered from the paged cache (a per-request engine)."""
    write_kv(k, v, cache, meta.slot_mapping.long())
    flat = cache.view(2, -1, *cache.shape[-2:])
    out = torch.empty_like(q)
    starts = meta.query_start_loc.tolist()
    for s in range(meta.num_seqs):
        lo, hi = starts[s], starts[s + 1]
        if hi == lo:
            continue
        slots = _slots(meta, s, block_size)
        keys, values = flat[0, slots].transpose(0, 1), flat[1, slots].transpose(0, 1)
        n, qn = keys.shape[1], hi - lo
        mask = torch.arange(n, device=q.device)[None, :] <= torch.arange(n - qn, n, device=q.device)[:, None]
        out[lo:hi] = F.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1), keys, values, attn_mask=mask, enable_gqa=True
        ).transpose(0, 1)
    return out


def sdpa_padded(q, k, v, cache, meta: BatchMetadata, block_size: int) -> torch.Tensor:
    """All sequences padded to the longest query and KV: one SDPA call (what a static-shape engine does)."""
    write_kv(k, v, cache, meta.slot_mapping.long())
    flat = cache.view(2, -1, *cache.shape[-2:])
    starts, seq_lens = meta.query_start_loc.long(), meta.seq_lens.long()
    q_lens = starts[1:] - starts[:-1]
    qm, m = int(q_lens.max()), int(seq_lens.max())
    qi, kv = torch.arange(qm, device=q.device), torch.arange(m, device=q.device)
    rows = starts[:-1, None] + torch.minimum(qi[None, :], (q_lens[:, None] - 1).clamp(min=0))
    tables = meta.block_tables.long()
    slots = tables[:, (kv // block_size).clamp(max=tables.shape[1] - 1)] * block_size + kv % block_size
    q_pos = (seq_lens - q_lens)[:, None] + qi[None, :]
    mask = kv[None, None, :] <= q_pos[:, :, None]
    keys, values = flat[0][slots].transpose(1, 2), flat[1][slots].transpose(1, 2)  # [S, KV, M, D]
    out_pad = F.scaled_dot_product_attention(
        q[rows].transpose(1, 2), keys, values, attn_mask=mask[:, None], enable_gqa=True
    ).transpose(1, 2)  # [S, Q, H, D]
    valid = qi[None, :] < q_lens[:, None]
    out = torch.empty_like(q)
    out[rows[valid]] = out_pad[valid]
    return out


def time_step(
    meta: BatchMetadata, blocks: int, block_size: int, dtype: torch.dtype, n_threads: int, repeats: int
) -> dict[str, float]:
    """Median ms per layer of each method on one recorded step (interleaved runs, after a checked warm-up)."""
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(2, blocks, block_size, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    q = torch.randn(meta.num_tokens, HEADS, HEAD_DIM, generator=gen).to(dtype)
    k, v = (torch.randn(meta.num_tokens, KV_HEADS, HEAD_DIM, generator=gen).to(dtype) for _ in "kv")
    sizes, scale = tile_sizes(HEAD_DIM, dtype), HEAD_DIM**-0.5

    def ours() -> None:
        table = plan_tasks(meta, HEADS, KV_HEADS, sizes, n_threads)
        for _ in range(LAYERS):  # one plan serves every layer of a forward
            meta_attention(q, k, v, cache, table, scale)

    def reference() -> None:
        plan = plan_attention(meta, block_size)
        for _ in range(LAYERS):
            paged_attention(q, k, v, cache, plan, scale)

    def loop() -> None:
        for _ in range(LAYERS):
            sdpa_loop(q, k, v, cache, meta, block_size)

    def padded() -> None:
        for _ in range(LAYERS):
            sdpa_padded(q, k, v, cache, meta, block_size)

    table = plan_tasks(meta, HEADS, KV_HEADS, sizes, n_threads)
    got = meta_attention(q, k, v, cache.clone(), table, scale).float()
    expected = sdpa_loop(q, k, v, cache.clone(), meta, block_size).float()
    assert torch.allclose(got, expected, atol=3e-2, rtol=3e-2), "meta-attention disagrees with SDPA"
    methods = {"meta": ours, "reference": reference, "loop": loop, "padded": padded}
    for fn in methods.values():  # warm-up
        fn()
    runs: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):  # interleaved: machine noise hits every method alike
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            runs[name].append((time.perf_counter() - start) * 1e3 / LAYERS)
    return {name: statistics.median(r) for name, r in runs.items()}


STAGES = ("decode", "short", "prefill")


def stage_tables(meta: BatchMetadata, sizes: TileSizes) -> dict[str, TaskTable]:
    """The 1-thread Task-Table of a step cut by stage (decodes, short blocks, prefill tiles): where the op's
    time goes. One thread plans no KV splits, so each subset runs on its own."""
    table = plan_tasks(meta, HEADS, KV_HEADS, sizes, 1)
    q_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()
    seq_q = q_lens[table.tasks[:, 0].long()]
    stage = torch.where(seq_q == 1, 0, torch.where(seq_q <= sizes.short_rows, 1, 2))
    return {
        name: dataclasses.replace(
            table,
            tasks=table.tasks[stage == i].contiguous(),
            thread_starts=torch.tensor([0, int((stage == i).sum())]),
        )
        for i, name in enumerate(STAGES)
    }


def time_stages(
    meta: BatchMetadata, blocks: int, block_size: int, dtype: torch.dtype, repeats: int
) -> dict[str, float]:
    """Best ms per layer of the native op on each stage's tasks of one step (1 thread)."""
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(2, blocks, block_size, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    q = torch.randn(meta.num_tokens, HEADS, HEAD_DIM, generator=gen).to(dtype)
    tables = stage_tables(meta, tile_sizes(HEAD_DIM, dtype))
    runs: dict[str, list[float]] = {name: [] for name in STAGES}
    for _ in range(repeats + 1):  # the first round warms up
        for name, table in tables.items():
            start = time.perf_counter()  # the op alone: the step's KV write is not part of any stage
            torch.ops.meshserve.meta_attention(
                q,
                cache,
                table.block_tables,
                table.tasks,
                table.thread_starts,
                table.combine,
                table.tree_mask,
                HEAD_DIM**-0.5,
                0,
            )
            runs[name].append((time.perf_counter() - start) * 1e3)
    return {name: min(r[1:]) for name, r in runs.items()}


@torch.inference_mode()
def attention_section(
    steps: list[BatchMetadata],
    blocks: int,
    block_size: int,
    dtypes: list[str],
    threads: list[int],
    repeats: int,
) -> None:
    """Print per-layer attention time of each method on each recorded step, and the speed-ups."""
    assert native.load(), f"build the native kernels first: {native.BUILD_COMMAND}"
    print(
        f"\n== attention: one layer of the 28M Llama ({HEADS} heads, {KV_HEADS} KV heads, d={HEAD_DIM}), "
        f"median of {repeats} interleaved runs, ms =="
    )
    print(
        f"{'dtype':9s} {'thr':>3s}  {'step':52s} {'meta-attn':>9s} {'reference':>9s} {'sdpa-loop':>9s} "
        f"{'sdpa-pad':>9s}  {'vs best SDPA':>12s}"
    )
    gains = []
    for dtype_name, n_threads in itertools.product(dtypes, threads):
        torch.set_num_threads(n_threads)
        for meta in steps:
            ms = time_step(meta, blocks, block_size, getattr(torch, dtype_name), n_threads, repeats)
            gains.append(min(ms["loop"], ms["padded"]) / ms["meta"] - 1)
            print(
                f"{dtype_name:9s} {n_threads:3d}  {describe(meta):52s} {ms['meta']:9.3f} "
                f"{ms['reference']:9.3f} {ms['loop']:9.3f} {ms['padded']:9.3f}  {gains[-1]:+11.1%}"
            )
    print(
        f"meta-attention vs the faster SDPA baseline: median {statistics.median(gains):+.1%} "
        f"(paper anchor: {PAPER_ATTENTION_GAIN:+.1%})"
    )
    print(
        f"\n-- where meta-attention's time goes: each stage's tasks alone, 1 thread, best of {repeats}, ms --"
    )
    print(f"{'dtype':9s} {'step':52s} " + " ".join(f"{name:>8s}" for name in STAGES))
    torch.set_num_threads(1)
    for dtype_name in dtypes:
        for meta in steps:
            ms = time_stages(meta, blocks, block_size, getattr(torch, dtype_name), repeats)
            print(f"{dtype_name:9s} {describe(meta):52s} " + " ".join(f"{ms[name]:8.3f}" for name in STAGES))


# Graph-capture engines pad M to a captured size: vLLM's default sizes are 1, 2, 4, then multiples of 8.
PAD_BUCKETS = [1, 2, 4] + list(range(8, 4097, 8))
GEMM_SWEEP = (1, 3, 8, 13, 24, 33, 50, 64, 77, 100, 128, 150, 200, 257, 300, 384, 450, 512)


def llama_linear_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of each linear layer of the 28M Llama."""
    h, i, v = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["vocab_size"]
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i), "lm_head": (v, h)}


def time_gemm(
    name: str, n: int, k: int, dtype: torch.dtype, table: GemmTable, budget: int, repeats: int
) -> dict[str, float]:
    """Seconds summed over the M sweep (each M once) for F.linear, pad-to-bucket and SmoothGEMM."""
    gen = torch.Generator().manual_seed(0)
    layer = SmoothLinear(k, n, bias=False).to(dtype)
    layer.weight.data = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    layer.prepare(table.by_m(shape_key(n, k), dtype, budget))
    xs = [torch.randn(m, k, generator=gen).to(dtype) for m in GEMM_SWEEP if m <= budget]
    w = layer.weight
    methods = {
        "F.linear": lambda x: F.linear(x, w),
        "pad-bucket": lambda x: pad_to_bucket_linear(x, w, None, PAD_BUCKETS),
        "smooth": layer,
    }
    for x in xs:
        torch.testing.assert_close(layer(x), F.linear(x, w), atol=3e-2, rtol=2e-2)
        for fn in methods.values():  # warm-up: every shape's primitive is created once
            fn(x)
    runs: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):
        for method, fn in methods.items():  # interleaved
            start = time.perf_counter()
            for x in xs:
                fn(x)
            runs[method].append(time.perf_counter() - start)
    return {m: statistics.median(r) for m, r in runs.items()}


@torch.inference_mode()
def gemm_section(dtypes: list[str], threads: list[int], repeats: int, budget: int = 512) -> None:
    """SmoothGEMM (the table the engine would load here) vs pad-to-bucket vs F.linear over M = 1..budget."""
    table = load_gemm_table()
    print(
        f"\n== GEMM: the 28M Llama's linear layers, M in {GEMM_SWEEP[0]}..{budget} "
        f"({len(GEMM_SWEEP)} values, not multiples of 8 included), sum over M, median of {repeats} "
        f"interleaved runs, ms; "
        f"table: {table.machine or 'shipped'} =="
    )
    print(
        f"{'dtype':9s} {'thr':>3s}  {'layer':8s} {'N x K':>10s} {'F.linear':>9s} {'pad-bucket':>10s} "
        f"{'smooth':>9s}  {'vs F.linear':>11s} {'vs pad':>7s}"
    )
    gains: dict[str, list[float]] = {d: [] for d in dtypes}
    for dtype_name, n_threads in itertools.product(dtypes, threads):
        torch.set_num_threads(n_threads)
        for name, (n, k) in llama_linear_shapes().items():
            s = time_gemm(name, n, k, getattr(torch, dtype_name), table, budget, repeats)
            gains[dtype_name].append(s["F.linear"] / s["smooth"] - 1)
            print(
                f"{dtype_name:9s} {n_threads:3d}  {name:8s} {f'{n}x{k}':>10s} {s['F.linear'] * 1e3:9.2f} "
                f"{s['pad-bucket'] * 1e3:10.2f} {s['smooth'] * 1e3:9.2f}  {gains[dtype_name][-1]:+10.1%} "
                f"{s['pad-bucket'] / s['smooth'] - 1:+7.1%}"
            )
    for dtype_name, g in gains.items():  # where the table says F.linear, the spread is the machine's noise
        print(
            f"SmoothGEMM vs F.linear, {dtype_name}: median {statistics.median(g):+.1%} over layers "
            f"(paper anchor: {PAPER_GEMM_GAIN:+.1%} vs its baseline GEMM library)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4, help="engine steps to record and replay")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["float32", "bfloat16"]
    )
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    sections = ["attention", "attention-roofline", "gemm", "bf16gemm", "moe", "fused"]
    parser.add_argument("--sections", nargs="+", default=sections, choices=[*sections, "gemm-roofline"])
    parser.add_argument(
        "--archs",
        nargs="+",
        default=["mixtral", "llama"],
        choices=["mixtral", "llama"],
        help="race models of the gemm-roofline section",
    )
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}; load average {Path('/proc/loadavg').read_text().split()[0]} "
        "(a shared machine: compare columns within a row)"
    )
    if {"attention", "attention-roofline"} & set(args.sections):
        steps, blocks, block_size = record_steps(args.steps)
    if "attention" in args.sections:
        attention_section(steps, blocks, block_size, args.dtypes, args.threads, args.repeats)
    if "attention-roofline" in args.sections:
        from attention_roofline import roofline_section as attention_roofline_section  # imports our helpers

        attention_roofline_section(steps, blocks, block_size, args.dtypes, args.repeats)
    if "gemm" in args.sections:
        gemm_section(args.dtypes, args.threads, args.repeats)
    if "bf16gemm" in args.sections and "bfloat16" in args.dtypes:
        bf16_gemm_section(args.threads, args.repeats)
    if "moe" in args.sections:
        moe_section(args.dtypes, args.threads, args.repeats)
    if "fused" in args.sections:
        fused_section(args.dtypes, args.threads, args.repeats)
    if "gemm-roofline" in args.sections:
        gemm_roofline_section(args.archs, args.dtypes, args.threads, args.repeats)


if __name__ == "__main__":
    main()
