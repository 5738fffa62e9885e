"""Where the dense race's time goes: meshserve alone on vllm_race.py's workload, profiled two ways.

    flock /tmp/meshserve-bench.lock .venv/bin/python benchmarks/dense_profile.py [--arch llama]
        [--dtype bfloat16] [--requests 64] [--threads 2] [--top 15] [--kernel-profile GEMM_TABLE]

Same model, workload, token budget (512), max_num_seqs (64) and threads as the race. After an untimed
warm-up, one plain timed run (output tokens/s), then one run under torch.profiler (the top CPU ops by
self time, % of the profiled total) and one under cProfile (the top Python functions by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import torch
from throughput import MODELS, standard_workload

from meshserve.engine import LLM, SamplingParams
from meshserve.testing import make_tiny_model


def op_table(prof: torch.profiler.profile, top: int) -> str:
    """Top ops by self CPU time with their share of the total self time."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    lines = [f"{'op':44s} {'calls':>7s} {'self ms':>9s} {'%':>6s}"]
    lines += [
        f"{e.key[:44]:44s} {e.count:7d} {e.self_cpu_time_total / 1e3:9.1f} "
        f"{100 * e.self_cpu_time_total / total:5.1f}%"
        for e in rows
    ]
    lines.append(f"{'total':44s} {'':7s} {total / 1e3:9.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama", choices=sorted(MODELS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--kernel-profile",
        help="GEMM table to run with (default: the engine's choice), "
        "e.g. an older tree's meshserve/kernels/profiles/gemm.json for a before/after",
    )
    args = parser.parse_args()
    prompts, outputs = standard_workload(args.requests)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in outputs]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(Path(tmp) / args.arch, arch=args.arch, dtype=args.dtype, **MODELS[args.arch])
        llm = LLM(
            str(path),
            dtype=args.dtype,
            max_num_batched_tokens=args.budget,
            max_num_seqs=64,
            kv_cache_memory=1.0,
            num_threads=args.threads,
            kernel_profile=args.kernel_profile,
        )

        def run() -> int:
            return sum(len(o.token_ids) for o in llm.generate(prompts, params, use_tqdm=False))

        llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
        start = time.perf_counter()
        tokens = run()
        rate = tokens / (time.perf_counter() - start)
        print(f"{args.arch} {args.dtype}, {args.threads} threads: {rate:.1f} output tok/s (unprofiled)")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
        print(op_table(prof, args.top))
        profiler = cProfile.Profile()
        profiler.runcall(run)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
        print("\n".join(ln for ln in out.getvalue().splitlines() if ln.strip())[-(args.top + 3) * 120 :])


if __name__ == "__main__":
    main()
