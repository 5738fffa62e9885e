"""The Triton Meta-Attention kernel on a CUDA GPU against SDPA baselines and a tutorial flash attention.

    flock /tmp/meshserve-bench.lock .venv/bin/python benchmarks/triton_attention.py [--repeats 5]
        [--dtype bfloat16]

Needs a CUDA GPU and triton (`pip install -e '.[gpu]'`); without CUDA it says so and exits 0.
Shapes of a Llama-3-8B layer (32 heads, 8 KV heads, head_dim 128, block size 16). For each mixed batch
(decodes beside prefill chunks, verify blocks) one layer's attention, KV write included, runs as

- triton: the kernel over the Task-Table (planned and copied to the GPU once per batch, as a forward
  shares it across layers),
- sdpa-loop: one `scaled_dot_product_attention` per sequence over its KV gathered from the cache,
- sdpa-padded: one SDPA over all sequences padded to the longest query and KV (boolean mask),

then a prefill-only batch (equal fresh prompts, dense causal) adds

- flash-tutorial: the Triton tutorial's fused attention (benchmarks/flash_tutorial.py: dense [B, H, N, D],
  causal, no paging, no KV write), and sdpa-causal: SDPA's `is_causal` on the same dense tensors.

Each figure is the median over --repeats interleaved rounds of `triton.testing.do_bench` (median ms); the
max |difference| to sdpa-loop is printed beside each method so a fast wrong kernel shows.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from kernels import sdpa_loop, sdpa_padded

from meshserve.kernels.attention import TRITON_TILES
from meshserve.kernels.attention_tiles import plan_tasks
from meshserve.models.batch import BatchMetadata

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
# (cached context, new query rows) per sequence
BATCHES = {
    "decode-heavy: 60 decodes (KV 256..8k) + 2 chunks": [(256 + 131 * i, 1) for i in range(60)]
    + [(0, 512), (2048, 256)],
    "verify: 32 blocks of 5 (KV 1k..4k) + 16 decodes": [(1024 + 96 * i, 5) for i in range(32)]
    + [(512 * i, 1) for i in range(1, 17)],
    "prefill-heavy: 2 chunks of 2k + 16 decodes": [(0, 2048), (1024, 2048)] + [(4096, 1)] * 16,
}
PREFILL = (4, 2048)  # prefill-only: 4 fresh prompts of 2,048 tokens


def make_batch(seqs: list[tuple[int, int]], seed: int) -> tuple[BatchMetadata, int]:
    """Sequences (cached context, new rows) over randomly permuted cache blocks; returns (meta, blocks)."""
    gen = torch.Generator().manual_seed(seed)
    ctx, q_lens = torch.tensor([c for c, _ in seqs]), torch.tensor([q for _, q in seqs])
    seq_lens = ctx + q_lens
    need = -(-seq_lens // BLOCK_SIZE)
    blocks = torch.randperm(int(need.sum()), generator=gen)
    width = int(need.max())
    col = torch.arange(width)
    first = torch.cumsum(need, 0) - need
    own = blocks[(first[:, None] + col).clamp(max=len(blocks) - 1)]
    tables = torch.where(col[None, :] < need[:, None], own, 0)
    seq_of = torch.repeat_interleave(torch.arange(len(seqs)), q_lens)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(q_lens, 0)])
    pos = ctx[seq_of] + torch.arange(int(q_lens.sum())) - starts[seq_of]
    meta = BatchMetadata(
        positions=pos,
        slot_mapping=tables[seq_of, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE,
        query_start_loc=starts.int(),
        seq_lens=seq_lens.int(),
        block_tables=tables.int(),
        logits_indices=starts[1:] - 1,
    )
    return meta, len(blocks)


def interleaved(methods: dict, repeats: int) -> dict[str, float]:
    """Median over rounds of each method's do_bench median (ms), the methods taking turns each round."""
    import triton.testing

    runs: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            runs[name].append(triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median"))
    return {name: statistics.median(ms) for name, ms in runs.items()}


def print_rows(times: dict[str, float], errors: dict[str, float]) -> None:
    fastest_baseline = min(ms for name, ms in times.items() if name != "triton")
    for name, ms in times.items():
        print(
            f"    {name:15s} {ms:8.3f} ms   {ms / times['triton']:6.2f}x triton's time   "
            f"max|diff| {errors.get(name, 0.0):.1e}"
        )
    print(f"    triton speed-up over the fastest baseline: {fastest_baseline / times['triton']:.2f}x")


def mixed_section(name: str, seqs, dtype: torch.dtype, repeats: int, device: torch.device) -> None:
    from meshserve.kernels.triton_attention import prepare, triton_attention

    meta, num_blocks = make_batch(seqs, seed=0)
    table = plan_tasks(meta, HEADS, KV_HEADS, TRITON_TILES, 1)
    on_device = prepare(table, device)  # once per forward, shared by its layers
    meta_dev = meta.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=gen, device=device).to(dtype)
    q = torch.randn(meta.num_tokens, HEADS, HEAD_DIM, generator=gen, device=device).to(dtype)
    k, v = (
        torch.randn(meta.num_tokens, KV_HEADS, HEAD_DIM, generator=gen, device=device).to(dtype) for _ in "kv"
    )
    scale = HEAD_DIM**-0.5
    methods = {
        "triton": lambda: triton_attention(q, k, v, cache, on_device, scale),
        "sdpa-loop": lambda: sdpa_loop(q, k, v, cache, meta_dev, BLOCK_SIZE),
        "sdpa-padded": lambda: sdpa_padded(q, k, v, cache, meta_dev, BLOCK_SIZE),
    }
    outs = {n: fn().float() for n, fn in methods.items()}
    errors = {n: float((o - outs["sdpa-loop"]).abs().max()) for n, o in outs.items()}
    print(f"  {name} ({meta.num_tokens} query rows, {len(table.tasks)} tasks)")
    print_rows(interleaved(methods, repeats), errors)


def prefill_section(dtype: torch.dtype, repeats: int, device: torch.device) -> None:
    from flash_tutorial import flash_forward

    from meshserve.kernels.triton_attention import prepare, triton_attention

    prompts, n = PREFILL
    meta, num_blocks = make_batch([(0, n)] * prompts, seed=1)
    table = plan_tasks(meta, HEADS, KV_HEADS, TRITON_TILES, 1)
    on_device = prepare(table, device)
    meta_dev = meta.to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    cache = torch.zeros(2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    q = torch.randn(meta.num_tokens, HEADS, HEAD_DIM, generator=gen, device=device).to(dtype)
    k, v = (
        torch.randn(meta.num_tokens, KV_HEADS, HEAD_DIM, generator=gen, device=device).to(dtype) for _ in "kv"
    )
    dense = [t.view(prompts, n, -1, HEAD_DIM).transpose(1, 2).contiguous() for t in (q, k, v)]  # [B, H, N, D]
    scale = HEAD_DIM**-0.5

    def undense(o: torch.Tensor) -> torch.Tensor:
        return o.transpose(1, 2).reshape(-1, HEADS, HEAD_DIM)

    methods = {
        "triton": lambda: triton_attention(q, k, v, cache, on_device, scale),
        "sdpa-loop": lambda: sdpa_loop(q, k, v, cache, meta_dev, BLOCK_SIZE),
        "sdpa-padded": lambda: sdpa_padded(q, k, v, cache, meta_dev, BLOCK_SIZE),
        "sdpa-causal": lambda: undense(
            F.scaled_dot_product_attention(*dense, is_causal=True, enable_gqa=True)
        ),
        "flash-tutorial": lambda: undense(flash_forward(*dense, scale)),
    }
    outs = {name: fn().float() for name, fn in methods.items()}
    errors = {name: float((o - outs["sdpa-loop"]).abs().max()) for name, o in outs.items()}
    print(
        f"  prefill-only: {prompts} fresh prompts of {n} ({meta.num_tokens} query rows, "
        f"{len(table.tasks)} tasks)"
    )
    print_rows(interleaved(methods, repeats), errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "benchmarks/triton_attention.py needs a CUDA GPU (and triton: pip install -e '.[gpu]'); "
            "none here, nothing measured."
        )
        sys.exit(0)
    import triton

    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{args.dtype}, "
        f"{HEADS} heads / {KV_HEADS} KV heads, head_dim {HEAD_DIM}, block {BLOCK_SIZE}; "
        f"median of {args.repeats} interleaved do_bench medians, one layer, KV write included"
    )
    for name, seqs in BATCHES.items():
        mixed_section(name, seqs, dtype, args.repeats, device)
    prefill_section(dtype, args.repeats, device)


if __name__ == "__main__":
    main()
