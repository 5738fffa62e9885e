"""Offline throughput: meshserve's engine vs transformers `generate` on the standard workload.

    .venv/bin/python benchmarks/throughput.py [--requests 64] [--archs llama mixtral]
        [--dtypes float32 bfloat16] [--steps 2000] [--threads 1]

Standard workload: 64 requests, prompt lengths uniform in [32, 512], output lengths uniform in
[16, 128], ignore_eos, random token ids from a seeded generator. Models: a tiny Llama (~28M
parameters: hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1408, vocab 4096), a tiny
Mixtral (the same with 8 experts, top-2, intermediate 704) and a ~5M Llama (hidden 256, 4 layers,
4 heads, 2 KV heads, intermediate 704, vocab 4096), random weights made on the spot.

transformers runs static batches of 16 requests in arrival order, left-padded, each batch
generating as many tokens as its longest request; only the tokens each request asked for count.
meshserve runs all requests through its token-budget scheduler. Both print output tokens/s.

Then a steady-state run of ``--steps`` engine steps (requests keep arriving; first arch, last
dtype) checks that the KV cache is allocated once (same tensors, same addresses) and resident
memory stays flat (within 2% from the first quarter of the run to the end; the RSS series is
printed). glibc's malloc thresholds are pinned for that part, as the server pins them
(``pin_malloc_thresholds``).
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from meshserve.engine import LLM, SamplingParams
from meshserve.memory import pin_malloc_thresholds, rss_mib
from meshserve.testing import make_tiny_model

LLAMA = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 1408,
    "vocab_size": 4096,
    "max_position_embeddings": 1024,
}
MODELS = {
    "llama": LLAMA,
    # ~5M parameters: per-step overhead (Python, small ops), not GEMM time, decides its speed.
    "llama-5m": {
        **LLAMA,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 704,
    },
    "mixtral": {**LLAMA, "intermediate_size": 704, "num_local_experts": 8, "num_experts_per_tok": 2},
}
HF_BATCH = 16


def standard_workload(
    n: int = 64,
    vocab: int = 4096,
    seed: int = 0,
    prompt_range: tuple[int, int] = (32, 512),
    output_range: tuple[int, int] = (16, 128),
) -> tuple[list[list[int]], list[int]]:
    """Prompts of random token ids and output lengths, both uniform in their (inclusive) ranges."""
    rng = np.random.default_rng(seed)
    prompts = [
        rng.integers(3, vocab, int(rng.integers(prompt_range[0], prompt_range[1] + 1))).tolist()
        for _ in range(n)
    ]
    outputs = [int(rng.integers(output_range[0], output_range[1] + 1)) for _ in range(n)]
    return prompts, outputs


def run_transformers(path: Path, dtype: str, prompts: list[list[int]], outputs: list[int]) -> float:
    """Output tokens/s of `generate` over static left-padded batches of HF_BATCH requests."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    pad = 0

    def batch_run(lo: int, hi: int) -> None:
        batch = prompts[lo:hi]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        new = max(outputs[lo:hi])
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
            )

    batch_run(0, 2)  # warm-up
    start = time.perf_counter()
    for lo in range(0, len(prompts), HF_BATCH):
        batch_run(lo, lo + HF_BATCH)
    return sum(outputs) / (time.perf_counter() - start)


def make_llm(path: Path, dtype: str, budget: int) -> LLM:
    return LLM(
        str(path),
        dtype=dtype,
        max_num_batched_tokens=budget,
        max_num_seqs=64,
        kv_cache_memory=1.0,
        num_threads=torch.get_num_threads(),
    )


def run_meshserve(llm: LLM, prompts: list[list[int]], outputs: list[int]) -> tuple[float, int]:
    """Output tokens/s of LLM.generate on the whole workload, and the steps it took."""
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in outputs]
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    steps = llm.engine.num_steps
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    assert [len(r.token_ids) for r in results] == outputs
    return sum(outputs) / seconds, llm.engine.num_steps - steps


def steady_state(path: Path, dtype: str, budget: int, steps: int, seed: int) -> None:
    """Run ``steps`` engine steps with requests arriving all the time; check KV and RSS stay put.

    The KV cache is small (0.125 GiB) so the prefix cache fills within the warm-up and what follows
    is the steady state; RSS is read every 250 steps.
    """
    llm = LLM(str(path), dtype=dtype, max_num_batched_tokens=budget, max_num_seqs=64, kv_cache_memory=0.125)
    engine = llm.engine
    caches = [(t.data_ptr(), t.shape) for t in engine.kv_caches]
    prompts, outputs = standard_workload(4096, seed=seed + 1, prompt_range=(16, 128), output_range=(8, 64))
    next_req, in_flight = 0, 0
    rss: dict[int, float] = {}
    for step in tqdm(range(1, steps + 1), desc="steady state", unit="step", mininterval=5):
        while in_flight < 24:
            i = next_req % len(prompts)
            params = SamplingParams(temperature=0, max_tokens=outputs[i], ignore_eos=True)
            engine.add_request(prompts[i], params)
            next_req, in_flight = next_req + 1, in_flight + 1
        in_flight -= len(engine.step())
        if step % 250 == 0:
            gc.collect()
            rss[step] = rss_mib()
    while engine.has_unfinished():
        engine.step()
    same = [(t.data_ptr(), t.shape) for t in engine.kv_caches] == caches
    free_ok = engine.blocks.num_free_blocks == engine.blocks.num_blocks
    print(
        f"steady state ({path.name}): {steps} steps, {next_req} requests; KV cache allocated once: {same} "
        f"({len(caches)} layer tensors, {engine.blocks.num_blocks} blocks, all free at the end: {free_ok})"
    )
    print("RSS MiB by step: " + ", ".join(f"{k}: {v:.1f}" for k, v in rss.items()))
    warm = min(k for k in rss if k >= steps // 4)  # the prefix cache has filled the small KV cache by then
    first, last = rss[warm], rss[max(rss)]
    growth = last - first
    verdict = "flat" if abs(growth) < 0.02 * first else "NOT flat"
    print(
        f"RSS after warm-up (step {warm}): {first:.1f} MiB, at step {max(rss)}: {last:.1f} MiB, "
        f"growth {growth:+.1f} MiB -> {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--archs", nargs="+", default=list(MODELS), choices=list(MODELS))
    dtypes = ["float32", "bfloat16"]
    parser.add_argument("--dtypes", nargs="+", default=dtypes, choices=dtypes)
    parser.add_argument(
        "--budget", type=int, default=512, help="max_num_batched_tokens (512: vLLM's chunked-prefill default)"
    )
    parser.add_argument("--steps", type=int, default=2000, help="steady-state steps for the memory check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both engines (1: on a shared machine, more threads than free "
        "cores stall every op at OpenMP barriers)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}; RSS at start {rss_mib():.1f} MiB"
    )
    prompts, outputs = standard_workload(args.requests, seed=args.seed)
    print(
        f"workload: {len(prompts)} requests, {sum(map(len, prompts))} prompt tokens, "
        f"{sum(outputs)} output tokens (ignore_eos)"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            for dtype in args.dtypes:
                path = make_tiny_model(
                    Path(tmp) / f"{arch}-{dtype}",
                    arch=arch.split("-")[0],
                    seed=args.seed,
                    dtype=dtype,
                    **MODELS[arch],
                )
                hf = run_transformers(path, dtype, prompts, outputs)
                llm = make_llm(path, dtype, args.budget)
                ours, steps = run_meshserve(llm, prompts, outputs)
                rows.append((arch, dtype, hf, ours, steps))
                print(
                    f"{arch:8s} {dtype:9s} transformers {hf:8.1f} tok/s | meshserve {ours:8.1f} tok/s "
                    f"({steps} steps) | ratio {ours / hf:5.2f}x",
                    flush=True,
                )
                del llm
                gc.collect()
                if (arch, dtype) == (args.archs[0], args.dtypes[-1]):
                    steady_path = path
        if args.steps:
            # After the timed runs, as the server runs: malloc thresholds pinned.
            print(f"glibc malloc thresholds pinned: {pin_malloc_thresholds()}")
            steady_state(steady_path, args.dtypes[-1], args.budget, args.steps, args.seed)
    print(
        f"\noutput tokens/s (floor for issue 5: meshserve >= 2x transformers); "
        f"load average at the end {os.getloadavg()[0]:.1f}"
    )
    print(f"{'model':8s} {'dtype':9s} {'transformers':>13s} {'meshserve':>10s} {'ratio':>6s}")
    for arch, dtype, hf, ours, _ in rows:
        print(f"{arch:8s} {dtype:9s} {hf:13.1f} {ours:10.1f} {ours / hf:5.2f}x")


if __name__ == "__main__":
    main()
