"""Decode of a real-size model against the memory read roofline: the whole step, then op by op.

    flock /tmp/bench.lock .venv/bin/python benchmarks/decode_roofline.py [--arch llama]
        [--dir /tmp/meshserve-load] [--requests 16] [--prompt-len 128] [--steps 8] [--threads 2]

The checkpoint is benchmarks/load.py's (Llama-3.2-1B's shape, or the 32-expert MoE; written to --dir once).
The engine prefills --requests prompts, then times --steps decode steps one by one. Every decode step reads
each weight once (lm_head included; an untied input embedding only its rows) plus the KV so far; that over
the median step time, against the 2-thread DRAM read rate of benchmarks/read_bw.cpp (built and run here),
is decode's fraction of the read roofline.

Then where a step's time goes:
- the linear layers alone at M = 1..requests, each shape over all its layers in turn (so the weights come
  from DRAM, as in a step, not from a cache that one layer fits in): us per layer and GB/s of its weight;
- one decode step under torch.profiler: ops by self time, grouped by op and input shapes, and the step's
  wall time no op accounts for (Python, dispatch, threads waking at each op's fork).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: load.py's checkpoints

from load import MODELS, write  # noqa: E402

from meshserve.engine import LLM, SamplingParams  # noqa: E402
from meshserve.kernels.smooth_gemm import SmoothLinear  # noqa: E402

ARCHS = {"llama": "dense", "mixtral": "moe"}


def read_roofline(threads: int) -> float:
    """GB/s of ``threads`` threads reading 512 MiB buffers (benchmarks/read_bw.cpp, compiled now)."""
    exe = Path(tempfile.gettempdir()) / "meshserve-read_bw"
    src = Path(__file__).resolve().parent / "read_bw.cpp"
    subprocess.run(["g++", "-O2", "-march=native", "-pthread", "-o", exe, src], check=True)
    out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout.splitlines()
    want = f"threads={threads} bytes={512 << 20} "
    return float(next(ln for ln in out if want in ln).rsplit("=", 1)[1])


def step_bytes(model: torch.nn.Module, contexts: int) -> tuple[int, int]:
    """(weight bytes a decode step reads, KV bytes of ``contexts`` cached tokens)."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(
        p.numel() * p.element_size() for m in model.modules() for p in getattr(m, "packed", None) or ()
    )
    if not cfg.tie_word_embeddings:  # the input embedding reads only its rows
        weights -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    kv = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * model.embed_tokens.weight.element_size()
    return weights, kv * contexts


@torch.inference_mode()  # as the engine runs them: its staging buffers are inference tensors
def linear_table(model: torch.nn.Module, ms: list[int], reps: int) -> list[str]:
    """us per layer and weight GB/s of each linear shape at each M, all layers of a shape in turn."""
    by_shape: dict[tuple[int, int], list[SmoothLinear]] = {}
    for m in model.modules():
        if isinstance(m, SmoothLinear):
            by_shape.setdefault(tuple(m.weight.shape), []).append(m)
    lines = [f"{'N x K':>14s} {'layers':>6s} " + " ".join(f"{'M=' + str(m):>16s}" for m in ms)]
    for (n, k), layers in by_shape.items():
        nbytes = n * k * layers[0].weight.element_size()
        cells = []
        for m in ms:
            x = torch.randn(m, k).to(layers[0].weight.dtype)
            best = float("inf")
            for _ in range(reps):
                start = time.perf_counter()
                for layer in layers:
                    layer(x)
                best = min(best, (time.perf_counter() - start) / len(layers))
            cells.append(f"{best * 1e6:7.0f} {nbytes / best / 1e9:5.1f}GB/s")
        lines.append(f"{f'{n}x{k}':>14s} {len(layers):6d} " + " ".join(f"{c:>16s}" for c in cells))
    return lines


def op_profile(engine: object, top: int) -> list[str]:
    """One decode step under torch.profiler: ops by self time (with input shapes), and the rest."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - start
    events = prof.key_averages(group_by_input_shape=True)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    lines = [f"{'op':34s} {'shapes':44s} {'calls':>5s} {'ms':>8s} {'%step':>6s}"]
    for e in rows[:top]:
        ms = e.self_cpu_time_total / 1e3
        shapes = str(e.input_shapes)[:44]
        lines.append(f"{e.key[:34]:34s} {shapes:44s} {e.count:5d} {ms:8.2f} {100 * ms / 1e3 / wall:5.1f}%")
    lines.append(f"step wall {wall * 1e3:.1f} ms (profiled); ops' self time {total * 1e3:.1f} ms")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    parser.add_argument("--dir", type=Path, default=Path("/tmp/meshserve-load"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="passes per linear shape and M (best counts)")
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args()

    path = args.dir / ARCHS[args.arch]
    if not (path / "config.json").is_file():
        write(ARCHS[args.arch], path)
    roof = read_roofline(args.threads)
    vocab = MODELS[ARCHS[args.arch]][1]["vocab_size"]
    llm = LLM(
        str(path),
        max_num_seqs=args.requests,
        max_num_batched_tokens=args.requests * args.prompt_len,
        max_model_len=args.prompt_len + args.steps + 8,
        kv_cache_memory=1.0,
        num_threads=args.threads,
    )
    engine, model = llm.engine, llm.engine.model
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.requests):
        prompt = torch.randint(vocab, (args.prompt_len,), generator=gen).tolist()
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=args.steps + 4, ignore_eos=True))
    engine.step()  # the whole prefill (its budget holds every prompt) and each request's first token
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    weights, kv = step_bytes(model, args.requests * (args.prompt_len + args.steps // 2))
    print(
        f"{args.arch} decode, {args.requests} requests at ~{args.prompt_len + args.steps // 2} tokens, "
        f"{args.threads} threads: median step {step * 1e3:.1f} ms (min {min(times) * 1e3:.1f}); reads "
        f"{weights / 1e9:.3f} GB of weights + {kv / 1e9:.3f} GB of KV = "
        f"{(weights + kv) / step / 1e9:.1f} GB/s; "
        f"read roofline {roof:.1f} GB/s: {(weights + kv) / step / roof / 1e9:.0%}",
        flush=True,
    )
    print("\n" + "\n".join(op_profile(engine, args.top)), flush=True)
    ms = sorted({1, 2, 4, 8, args.requests})
    print("\nlinear layers, us per layer and weight GB/s\n" + "\n".join(linear_table(model, ms, args.reps)))
    print(
        json.dumps({"step_ms": step * 1e3, "roofline_gbs": roof, "share": (weights + kv) / step / roof / 1e9})
    )


if __name__ == "__main__":
    main()
