"""The fused native elementwise ops (kernels/fused.py) vs their torch references, at the 28M Llama's
shapes over step sizes 1..512 tokens: the section `benchmarks/kernels.py --sections fused` prints.

Each op as the forward calls it: add+RMSNorm [M, 512], rotary on the qkv GEMM output [M, 1024] in place,
SiLU-mul [M, 2816] -> [M, 1408]; the reference path is what MESHSERVE_FUSED=reference runs. Median of
--repeats interleaved runs, microseconds per call.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import torch
from throughput import LLAMA

from meshserve import switches
from meshserve.kernels import fused

ROWS = (1, 16, 128, 512)
HEADS, KV_HEADS = LLAMA["num_attention_heads"], LLAMA["num_key_value_heads"]
HIDDEN, INTER = LLAMA["hidden_size"], LLAMA["intermediate_size"]
HEAD_DIM = HIDDEN // HEADS


def op_calls(m: int, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """One call of each op on fresh random operands of M rows."""
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, HIDDEN, generator=gen).to(dtype)
    delta = torch.randn(m, HIDDEN, generator=gen).to(dtype)
    weight = torch.rand(HIDDEN, generator=gen).to(dtype)
    qkv = torch.randn(m, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=gen).to(dtype)
    angle = torch.rand(m, HEAD_DIM, generator=gen) * 6
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    gate_up = torch.randn(m, 2 * INTER, generator=gen).to(dtype)
    return {
        "add_rms_norm": lambda: fused.add_rms_norm(x, delta, weight, 1e-6),
        "rotary_qkv": lambda: fused.rotary_qkv(qkv, cos, sin, HEADS, KV_HEADS, HEAD_DIM),
        "silu_mul": lambda: fused.silu_mul(gate_up, dtype),
    }


def time_op(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


@torch.inference_mode()
def fused_section(dtypes: list[str], threads: list[int], repeats: int) -> None:
    print(
        f"\n== fused elementwise ops: native vs torch reference, 28M Llama shapes, median of {repeats} "
        "interleaved runs, us per call =="
    )
    print(f"{'dtype':9s} {'thr':>3s} {'op':13s} {'M':>4s} {'native':>9s} {'reference':>9s} {'speed-up':>8s}")
    try:
        for dtype_name, n_threads in itertools.product(dtypes, threads):
            torch.set_num_threads(n_threads)
            for m in ROWS:
                calls = max(3, 2000 // m)
                for name, fn in op_calls(m, getattr(torch, dtype_name)).items():
                    runs: dict[str, list[float]] = {"native": [], "reference": []}
                    for _ in range(repeats + 1):  # the first round warms up and is dropped
                        for mode in runs:
                            switches.use(switches.read({"MESHSERVE_FUSED": mode}))
                            runs[mode].append(time_op(fn, calls))
                    nat, ref = (statistics.median(runs[k][1:]) for k in ("native", "reference"))
                    print(
                        f"{dtype_name:9s} {n_threads:3d} {name:13s} {m:4d} {nat * 1e6:9.1f} "
                        f"{ref * 1e6:9.1f} {ref / nat:7.2f}x",
                        flush=True,
                    )
    finally:
        switches.use(None)  # back to the environment's
