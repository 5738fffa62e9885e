"""Automatic prefix caching: 64 requests sharing a 384-token prefix, throughput with caching on vs off.

    .venv/bin/python benchmarks/prefix.py [--requests 64] [--prefix 384] [--small]

Each request is the shared prefix plus a unique suffix of 16-128 tokens (seeded random token ids) and
generates 16-64 tokens (ignore_eos, greedy). Both runs use the same model, prompts and engine settings;
only ``enable_prefix_caching`` differs. Runs alternate off/on ``--repeats`` times, each with a fresh engine
(an empty cache), and the fastest of each is kept, so a busy machine skews the ratio less. Prints throughput
(prompt + output tokens per second and output tokens per second), the cache hit rate, and the on/off ratio,
and checks both settings produced the same tokens.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from throughput import LLAMA  # benchmarks run as scripts: their folder is on sys.path

from meshserve.engine.llm import LLM
from meshserve.engine.sampling_params import SamplingParams
from meshserve.testing import make_tiny_model

MODEL = LLAMA  # the standard tiny Llama of benchmarks/throughput.py (~28M parameters)
SMALL = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "vocab_size": 4096,
    "max_position_embeddings": 2048,
}


def workload(n: int, prefix_len: int, vocab: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, vocab, prefix_len).tolist()
    prompts = [prefix + rng.integers(3, vocab, int(rng.integers(16, 129))).tolist() for _ in range(n)]
    params = [
        SamplingParams(temperature=0, max_tokens=int(rng.integers(16, 65)), ignore_eos=True) for _ in range(n)
    ]
    return prompts, params


def run(
    model: Path,
    prompts: list[list[int]],
    params: list[SamplingParams],
    caching: bool,
    args: argparse.Namespace,
) -> dict:
    llm = LLM(
        str(model),
        enable_prefix_caching=caching,
        max_num_batched_tokens=args.budget,
        max_num_seqs=args.max_num_seqs,
        dtype=args.dtype,
    )
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
    cache = llm.engine.blocks.prefix_cache
    hits_before = cache.hit_tokens if cache is not None else 0
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    stats = llm.engine.last_stats
    hits = (cache.hit_tokens if cache is not None else 0) - hits_before
    return {
        "seconds": seconds,
        "tok_s": (in_tokens + out_tokens) / seconds,
        "prefilled": in_tokens - hits,
        "out_tok_s": out_tokens / seconds,
        "hit_rate": stats.get("prefix_hit_rate", 0.0),
        "tokens": [o.outputs[0].token_ids for o in outs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prefix", type=int, default=384)
    parser.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--small", action="store_true", help="a 2-layer model (quick check)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating off/on runs; the best is kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = SMALL if args.small else MODEL
    best: dict[bool, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "llama", arch="llama", seed=args.seed, dtype=args.dtype, **cfg)
        prompts, params = workload(args.requests, args.prefix, cfg["vocab_size"], args.seed)
        for _ in range(args.repeats):
            for caching in (False, True):
                r = run(model, prompts, params, caching, args)
                if caching not in best or r["seconds"] < best[caching]["seconds"]:
                    best[caching] = r
    off, on = best[False], best[True]
    name = f"llama h{cfg['hidden_size']} L{cfg['num_hidden_layers']} {args.dtype}"
    print(
        f"\nprefix caching: {args.requests} requests, shared prefix {args.prefix} tokens, "
        f"suffix 16-128, output 16-64, budget {args.budget}, {name}"
    )
    # Prompt tokens actually computed do not depend on how busy the machine is; the seconds do.
    print(f"{'caching':<8} {'seconds':>8} {'tok/s':>9} {'out tok/s':>10} {'hit rate':>9} {'prefilled':>10}")
    for label, r in (("off", off), ("on", on)):
        print(
            f"{label:<8} {r['seconds']:8.2f} {r['tok_s']:9.1f} {r['out_tok_s']:10.1f} {r['hit_rate']:9.1%} "
            f"{r['prefilled']:10d}"
        )
    print(
        f"speedup on/off: {on['tok_s'] / off['tok_s']:.2f}x (target >= 2x); "
        f"same tokens: {on['tokens'] == off['tokens']}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
