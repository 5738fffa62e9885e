"""Speculative decoding with the shipped models: speedup and acceptance of the trained draft (and of
n-gram prompt lookup) vs no speculation, on held-out code prompts.

    .venv/bin/python benchmarks/spec.py [--requests 16] [--k 1 2 3] [--batch 1 16] [--repeats 3] [--threads 1]
        [--confidence 0.1 0.2] [--draft DIR [DIR ...]]

The target is meshserve/assets/models/tiny-moe (DeepSeek-style MoE, 64 experts top-8), the draft
tiny-draft (dense, same tokenizer, distilled from the target; docs/models.md), or the --draft directories
side by side. Each --confidence adds draft rows whose requests stop drafting at the first token the draft
gives less than that probability (speculative_config.draft_confidence). Prompts are 64-160 tokens from
stdlib files the models never trained on; greedy, 64 output tokens each. Settings alternate within every
repeat (a busy machine skews the ratios less) and the fastest repeat is kept. Every run must give the same
tokens as the run without speculation (greedy verification is exact). Beside wall-clock tok/s it prints
the process CPU time per output token and its ratio ("cpu x"): on a shared machine the CPU time is the
steadier of the two (with --threads 1 it excludes the time spent waiting for a core). Speculation pauses
while more requests run than speculative_config.disable_by_batch_size (default
DEFAULT_DISABLE_BY_BATCH_SIZE); batches above it also get "always" rows (disable_by_batch_size None),
which show what the rule saves.
"""

from __future__ import annotations

import argparse
import os
import time

from meshserve.assets import TINY_DRAFT, TINY_MOE
from meshserve.engine.llm import LLM
from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.spec.config import DEFAULT_DISABLE_BY_BATCH_SIZE
from meshserve.training.prompts import code_prompts


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict:
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    spec = llm.engine.spec
    before = spec.counters() if spec is not None else {}
    steps = llm.engine.num_steps
    start, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    after = spec.counters() if spec is not None else {}
    drafts = after.get("draft_tokens", 0) - before.get("draft_tokens", 0)
    accepted = after.get("accepted_tokens", 0) - before.get("accepted_tokens", 0)
    tokens = [o.token_ids for o in outs]
    return {
        "out_tok_s": sum(map(len, tokens)) / seconds,
        "cpu_ms_tok": cpu / sum(map(len, tokens)) * 1e3,
        "seconds": seconds,
        "tokens": tokens,
        "steps": llm.engine.num_steps - steps,
        "acceptance": accepted / drafts if drafts else 0.0,
        "drafts": drafts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3], help="num_speculative_tokens to try")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="max_num_seqs to try")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the fastest is kept")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument(
        "--confidence",
        type=float,
        nargs="*",
        default=[],
        help="draft_confidence values to try beside always drafting k",
    )
    parser.add_argument(
        "--draft",
        nargs="+",
        default=[str(TINY_DRAFT)],
        help="draft model directories (several: rows d1, d2, ... side by side)",
    )
    args = parser.parse_args()
    setups: dict[str, dict] = {"none": {}}
    names = {d: "draft" if len(args.draft) == 1 else f"d{i + 1}" for i, d in enumerate(args.draft)}
    for d in args.draft:
        for k in args.k:
            for c in [None, *args.confidence]:
                setups[f"{names[d]} k={k}" + (f" c={c:g}" if c is not None else "")] = {
                    "method": "draft_model",
                    "model": d,
                    "num_speculative_tokens": k,
                    "draft_confidence": c,
                }
    setups["ngram k=3"] = {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_max": 4,
        "prompt_lookup_min": 2,
    }
    for name in [n for n in setups if n != "none"]:
        setups[f"{name} always"] = {**setups[name], "disable_by_batch_size": None}
    rows = {
        b: [n for n in setups if b > DEFAULT_DISABLE_BY_BATCH_SIZE or not n.endswith("always")]
        for b in args.batch
    }
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llms = {
        (b, name): LLM(
            str(TINY_MOE),
            dtype=args.dtype,
            max_num_seqs=b,
            speculative_config=setups[name] or None,
            enable_prefix_caching=False,
            num_threads=args.threads,
        )
        for b in args.batch
        for name in rows[b]
    }
    prompts = code_prompts(next(iter(llms.values())).tokenizer, args.requests, 64, 160, seed=args.seed)
    results: dict[tuple[int, str], dict] = {}
    for _ in range(args.repeats):
        for key, llm in llms.items():
            r = run(llm, prompts, params)
            best = results.get(key, r)  # the fastest repeat; CPU time: the least of any repeat
            results[key] = {
                **(r if r["seconds"] < best["seconds"] else best),
                "cpu_ms_tok": min(r["cpu_ms_tok"], best["cpu_ms_tok"]),
            }
    print(
        f"\nspeculative decoding on held-out code: {args.requests} prompts of 64-160 tokens, "
        f"{args.max_tokens} greedy output tokens each, tiny-moe target, {args.dtype}, "
        f"best of {args.repeats}"
    )
    header = (
        "batch",
        "method",
        "out tok/s",
        "speedup",
        "cpu ms/tok",
        "cpu x",
        "steps",
        "drafts",
        "accept",
        "exact",
    )
    print("drafts: " + ", ".join(f"{name} = {d}" for d, name in names.items()))
    print(
        f"speculation pauses while more than {DEFAULT_DISABLE_BY_BATCH_SIZE} requests run "
        "(disable_by_batch_size); 'always' rows speculate at any batch size"
    )
    print("{:>5} {:<23} {:>10} {:>8} {:>10} {:>6} {:>6} {:>6} {:>7} {:>6}".format(*header))
    for b in args.batch:
        base = results[(b, "none")]
        for name in rows[b]:
            r = results[(b, name)]
            print(
                f"{b:5d} {name:<23} {r['out_tok_s']:10.1f} {r['out_tok_s'] / base['out_tok_s']:7.2f}x "
                f"{r['cpu_ms_tok']:10.3f} {base['cpu_ms_tok'] / r['cpu_ms_tok']:5.2f}x {r['steps']:6d} "
                f"{r['drafts']:6d} {r['acceptance']:7.1%} {str(r['tokens'] == base['tokens']):>6}"
            )
    threads = next(iter(llms.values())).engine.config.num_threads
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, {threads} torch threads")


if __name__ == "__main__":
    main()
