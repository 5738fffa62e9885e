"""bfloat16 linears of the 28M Llama, every kernel side by side over M: meshserve's native op (bf16_fma and
dpbf16 tiles) vs oneDNN's brgemm micro-kernel (AMX tiles where the CPU has them) vs oneDNN's bf16 kernel vs
oneDNN's float32 kernel on the widened weight vs F.linear.

    flock /tmp/meshserve-bench.lock .venv/bin/python benchmarks/bf16_gemm.py [--threads 1 2] [--repeats 7]
        [--shapes llama-28m | llama-1b] [--m 1 4 16 64 256]
    (also `benchmarks/kernels.py --sections bf16gemm`)

Each kernel gets its input as the engine hands it: packed_f32 and bf16_fma a float32 copy of the bfloat16
activations (the fused ops write it), the others bfloat16. Microseconds per call, median of --repeats
interleaved runs, and GFLOP/s; the fastest per row is starred. F.linear is the oracle: every kernel's
output is checked against it first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from throughput import LLAMA

from meshserve.kernels import native
from meshserve.kernels.bf16_gemm import bf16_linear, brgemm_linear, pack_bf16_pairs, pack_bf16_panels
from meshserve.kernels.smooth_gemm import pack_weight

M_SWEEP = (1, 4, 16, 32, 64, 128, 256, 512)


def llama_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of each linear layer of the 28M Llama (head_dim 64)."""
    h, i, v = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["vocab_size"]
    q, kv = LLAMA["num_attention_heads"] * 64, LLAMA["num_key_value_heads"] * 64
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i), "lm_head": (v, h)}


def llama_1b_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of Llama-3.2-1B's decoder linears (hidden 2048, 32 heads, 8 KV heads of 64, MLP 8192);
    its lm_head (128256 x 2048) is left out: its float32 pack alone is 1 GiB."""
    return {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}


SHAPES = {"llama-28m": llama_shapes, "llama-1b": llama_1b_shapes}


def kernels(w: torch.Tensor) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Each kernel as f(x_bf16, x_f32) -> y, its weight packed once here."""
    n = w.shape[0]
    packed, packed_f32, pairs = pack_weight(w), pack_weight(w.float()), pack_bf16_pairs(w)
    panels = pack_bf16_panels(w)

    def onednn(x: torch.Tensor, wp: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], "")

    return {
        "F.linear": lambda x, x32: F.linear(x, w),
        "onednn_bf16": lambda x, x32: onednn(x, packed),
        "packed_f32": lambda x, x32: onednn(x32, packed_f32),
        "bf16_fma": lambda x, x32: bf16_linear(x32, pairs, n, None, True),
        "dpbf16": lambda x, x32: bf16_linear(x, pairs, n, None, True, dpbf16=True),
        "brgemm": lambda x, x32: brgemm_linear(x, panels, n, None, True),
    }


def time_row(fns: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn, interleaved; each timed sample runs enough calls for ~2 ms."""
    calls = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(2e-3 / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


@torch.inference_mode()
def bf16_gemm_section(
    threads: list[int], repeats: int, shapes: str = "llama-28m", m_sweep: tuple[int, ...] = M_SWEEP
) -> None:
    if not native.load():
        print(f"\n== bf16 GEMM: native op not built (`{native.BUILD_COMMAND}`); skipped ==")
        return
    print(
        f"\n== bf16 GEMM: {shapes}'s linears, us per call (GFLOP/s), median of {repeats} interleaved "
        f"runs; * = fastest =="
    )
    gen = torch.Generator().manual_seed(0)
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for layer, (n, k) in SHAPES[shapes]().items():
            w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
            fns = kernels(w)
            print(f"{n_threads} thr  {layer} {n}x{k}: " + "  ".join(f"{name:>18s}" for name in fns))
            for m in m_sweep:
                x = torch.randn(m, k, generator=gen).bfloat16()
                x32 = x.float()
                ref = F.linear(x.float(), w.float())
                for name, fn in fns.items():  # the oracle first: each kernel's output against F.linear
                    torch.testing.assert_close(fn(x, x32).float(), ref, atol=3e-2, rtol=2e-2, msg=name)
                calls = {name: (lambda fn=fn, x=x, x32=x32: fn(x, x32)) for name, fn in fns.items()}
                times = time_row(calls, repeats)
                best = min(times.values())
                cells = [
                    f"{t * 1e6:9.1f}{'*' if t == best else ' '}({2 * m * n * k / t / 1e9:5.0f})"
                    for t in times.values()
                ]
                print(f"{'':18s} M={m:4d} " + "  ".join(f"{c:>18s}" for c in cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shapes", choices=list(SHAPES), default="llama-28m")
    parser.add_argument("--m", nargs="+", type=int, default=list(M_SWEEP), help="M values swept")
    args = parser.parse_args()
    bf16_gemm_section(args.threads, args.repeats, args.shapes, tuple(args.m))


if __name__ == "__main__":
    main()
