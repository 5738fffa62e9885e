"""Weight-only int8 / int4 linears vs our bfloat16 ones on Llama-3.2-1B's shapes, decode-sized M.

    flock /tmp/bench.lock .venv/bin/python benchmarks/quant_gemm.py [--m 1 4 16 64] [--repeats 5]
        [--layers qkv o gate_up down lm_head] [--threads 2]

Kernels, each on its weight packed once: ``bf16_fma`` and ``dpbf16`` (the native bfloat16 op as
SmoothLinear runs it: float32 or bfloat16 activations), ``int8`` (quantization="int8": per-channel
symmetric) and ``int4`` (quantization="int4": group 128, asymmetric) through ``quant_linear``. Each layer is
timed over enough copies of its weight (random integers and scales; the values do not change the speed)
that a pass reads >= 256 MiB, so the weights come from DRAM as in a decode step, not from the caches.
Per cell: microseconds per call (median of --repeats passes), weight GB/s (packed bytes with scales and
zeros), and % of the read roofline measured in the same run (the best of 5 sums of a 1 GiB tensor). Then
the step of a 16-layer 1B decoder (16 x (qkv + o + gate_up + down) + lm_head) as tokens per second,
M / step, and each quantized kernel's speed-up over the faster bfloat16 one. Every kernel's output is
checked against its oracle first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from meshserve.kernels import native
from meshserve.kernels.bf16_gemm import bf16_linear, pack_bf16_pairs
from meshserve.kernels.quant_gemm import pack_quant, quant_linear, unpack_quant
from meshserve.kernels.quant_weight import QuantWeight, quant_linear_reference

# (out, in) of Llama-3.2-1B's linears: hidden 2048, 32 heads and 8 KV heads of 64, MLP 8192, vocab 128256.
SHAPES = {
    "qkv": (3072, 2048),
    "o": (2048, 2048),
    "gate_up": (16384, 2048),
    "down": (2048, 8192),
    "lm_head": (128256, 2048),
}
DECODER_LAYERS = 16
PASS_BYTES = 256 << 20
KERNELS = ("bf16_fma", "dpbf16", "int8", "int4")


def random_weight(kernel: str, n: int, k: int, gen: torch.Generator):
    """One packed weight of the kernel's kind and its packed bytes."""
    if kernel in ("bf16_fma", "dpbf16"):
        packed = pack_bf16_pairs((torch.randn(n, k, generator=gen) * 0.02).bfloat16())
        return packed, packed.numel() * 2
    if kernel == "int8":
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        w = QuantWeight(8, q, torch.rand(n, 1, generator=gen) * 1e-3, None, k)
    else:
        q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
        z = torch.randint(0, 16, (n, k // 128), generator=gen, dtype=torch.uint8)
        w = QuantWeight(4, q, torch.rand(n, k // 128, generator=gen) * 1e-2, z, 128)
    packed = pack_quant(w)
    return packed, packed.nbytes


def run(kernel: str, packed, n: int, x: torch.Tensor, x32: torch.Tensor) -> torch.Tensor:
    if kernel == "bf16_fma":
        return bf16_linear(x32, packed, n, None, True)
    if kernel == "dpbf16":
        return bf16_linear(x, packed, n, None, True, dpbf16=True)
    return quant_linear(x, packed)


def check(kernel: str, packed, n: int, k: int) -> None:
    """The kernel against its oracle on a few rows (small weights stand in for the big ones' layout)."""
    x = torch.randn(3, k).bfloat16()
    y = run(kernel, packed, n, x, x.float()).float()
    if kernel in ("int8", "int4"):
        ref = quant_linear_reference(x.float(), unpack_quant(packed))
    else:
        w = packed.view(packed.shape[0], -1, 16, 2).permute(0, 2, 1, 3).reshape(-1, packed.shape[1] * 2)
        ref = F.linear(x.float(), w[:n, :k].float())
    torch.testing.assert_close(y, ref.float(), atol=2e-2 * ref.abs().max().item(), rtol=2e-2, msg=kernel)


def read_roofline(threads: int) -> float:
    """GB/s of the best of 5 sums of a 1 GiB float32 tensor (torch's threads: the kernels' own)."""
    torch.set_num_threads(threads)
    t = torch.ones(256 << 20)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - start)
    return t.numel() * 4 / best / 1e9


def time_layer(kernel: str, copies: list, n: int, k: int, m: int, repeats: int, gen) -> float:
    """Median seconds per call over `repeats` passes through all copies (one call each)."""
    x = torch.randn(m, k, generator=gen).bfloat16()
    x32 = x.float()
    for packed in copies:  # warm-up pass
        run(kernel, packed, n, x, x32)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for packed in copies:
            run(kernel, packed, n, x, x32)
        samples.append((time.perf_counter() - start) / len(copies))
    return statistics.median(samples)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--m", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if not native.load():
        raise SystemExit(f"native kernels not built: run `{native.BUILD_COMMAND}`")
    roof = read_roofline(args.threads)
    print(f"read roofline (1 GiB tensor sum, {args.threads} threads): {roof:.1f} GB/s")
    gen = torch.Generator().manual_seed(0)
    seconds: dict[tuple[str, str, int], float] = {}
    for layer in args.layers:
        n, k = SHAPES[layer]
        print(f"\n{layer} {n}x{k}: us per call / weight GB/s / % of roofline")
        print(f"{'M':>5s} " + "".join(f"{name:>26s}" for name in KERNELS))
        rows: dict[int, list[str]] = {m: [] for m in args.m}
        for kernel in KERNELS:
            small, _ = random_weight(kernel, 48, k, gen)
            check(kernel, small, 48, k)
            first, nbytes = random_weight(kernel, n, k, gen)
            copies = [first] + [random_weight(kernel, n, k, gen)[0] for _ in range(PASS_BYTES // nbytes)]
            for m in args.m:
                t = time_layer(kernel, copies, n, k, m, args.repeats, gen)
                seconds[(layer, kernel, m)] = t
                gbs = nbytes / t / 1e9
                rows[m].append(f"{t * 1e6:10.1f} /{gbs:6.1f} /{100 * gbs / roof:4.0f}%")
            del copies, first
        for m in args.m:
            print(f"{m:5d} " + "".join(f"{cell:>26s}" for cell in rows[m]), flush=True)
    if set(args.layers) == set(SHAPES):
        print(f"\n1B decode step ({DECODER_LAYERS} x (qkv + o + gate_up + down) + lm_head): tok/s (x bf16)")
        for m in args.m:
            step = {
                kern: DECODER_LAYERS * sum(seconds[(lay, kern, m)] for lay in ("qkv", "o", "gate_up", "down"))
                + seconds[("lm_head", kern, m)]
                for kern in KERNELS
            }
            bf16 = min(step["bf16_fma"], step["dpbf16"])
            cells = "  ".join(f"{kern} {m / s:8.1f} ({bf16 / s:4.2f}x)" for kern, s in step.items())
            print(f"M={m:3d}  {cells}")


if __name__ == "__main__":
    main()
