"""Where a batch-1 decode step's time goes, per op, for bf16 / int8 / int4 on the random ~1B Llama shapes.

    flock /tmp/bench.lock python benchmarks/decode_ops.py --dir /tmp/q1b [--layers 16] [--steps 16]
        [--methods bf16 int8 int4] [--top 12]

Each engine (benchmarks/quant.py's checkpoint, written there if missing) decodes a one-token prompt for
``--steps`` tokens under torch.profiler after a warm-up, so every step runs at M = 1. Per method: the ops
by self time (ms per step, % of the step), and each GEMM grouped by its input shapes with the weight
bytes it reads per call and the GB/s that makes (bf16: 2 N K; quantized: the packed integers, scales and
zeros). The profiler adds a few microseconds per op, so the step here is a little slower than unprofiled.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
from quant import write_dense

from meshserve.engine import LLM, SamplingParams

GEMM_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::linear",
    "meshserve::quant_linear",
    "meshserve::bf16_linear",
    "meshserve::brgemm_linear",
)


def weight_bytes(key: str, shapes: list) -> int:
    """Bytes of weight a GEMM call with these input shapes reads (0 when the shapes do not say)."""
    if key == "meshserve::bf16_linear" and len(shapes) >= 2:
        return 2 * math.prod(shapes[1])  # the pair-packed weight [N / 16, K / 2, 32]
    if key == "meshserve::quant_linear" and len(shapes) >= 3:
        return sum(math.prod(s) * (1 if i == 0 else 4) for i, s in enumerate(shapes[1:3]) if s)
    if key in ("aten::mm", "aten::addmm", "aten::linear") and len(shapes) >= 2:
        w = shapes[1] if key != "aten::addmm" else shapes[2]
        return 2 * math.prod(w) if len(w) == 2 else 0
    return 0


def profile(path: Path, method: str, steps: int, top: int) -> None:
    with LLM(
        str(path),
        dtype="bfloat16",
        quantization=None if method == "bf16" else method,
        max_num_seqs=1,
        max_model_len=256,
        enable_prefix_caching=False,
    ) as llm:
        prompt = {"prompt_token_ids": [7]}
        params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
        llm.generate(prompt, params, use_tqdm=False)  # warm-up
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
        ) as prof:
            llm.generate(prompt, params, use_tqdm=False)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(
        f"\n{method}: {total / 1e3 / steps:.2f} ms of op self time per step (profiled, load "
        f"{os.getloadavg()[0]:.2f})"
    )
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        ms = e.self_cpu_time_total / 1e3 / steps
        share = 100 * e.self_cpu_time_total / total
        print(f"  {e.key[:40]:40s} {e.count / steps:6.1f}/step {ms:8.3f} ms {share:5.1f}%")
    print("  GEMMs by shape: calls/step, us per call, weight MiB per call, GB/s")
    for e in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total):
        nbytes = weight_bytes(e.key, e.input_shapes)
        if e.key not in GEMM_OPS or not nbytes:
            continue
        us = e.self_cpu_time_total / e.count
        shape = (
            "x".join(str(d) for d in e.input_shapes[1]) if e.key != "aten::addmm" else str(e.input_shapes[2])
        )
        print(
            f"  {e.key[:24]:24s} {shape:16s} {e.count / steps:5.1f} {us:9.1f} {nbytes / 2**20:8.2f} "
            f"{nbytes / us / 1e3:6.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/qload-quant")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=["bf16", "int8", "int4"])
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    from load import DENSE

    path = Path(args.dir) / f"llama-1b-{args.layers}l-init002"
    if not (path / "config.json").exists():
        write_dense(path, {**DENSE, "num_hidden_layers": args.layers})
    for method in args.methods:
        profile(path, method, args.steps, args.top)


if __name__ == "__main__":
    main()
