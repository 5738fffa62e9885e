"""Weight-only int8 / int4 linears vs our bfloat16 ones on Llama-3.2-1B's shapes, decode-sized M (or any).

    flock /tmp/bench.lock .venv/bin/python benchmarks/quant_gemm.py [--m 1 4 16 64] [--repeats 5]
        [--layers qkv o gate_up down lm_head] [--threads 2] [--kernels ...] [--pass-mib 256]

Kernels, each on its weight packed once: ``bf16_fma`` and ``dpbf16`` (the native bfloat16 op as
SmoothLinear runs it: float32 or bfloat16 activations), ``brgemm`` (the bfloat16 brgemm op, what a
profile picks for prefill), ``int8`` (quantization="int8": per-channel symmetric) and ``int4``
(quantization="int4": group 128, asymmetric) through ``quant_linear`` on the path it picks here
(profiles/quant.json); ``int8/tiles`` and ``int4/tiles`` force its register tiles, ``int8/brgemm`` and
``int4/brgemm`` its brgemm path (csrc/quant_brgemm.h), to compare the two at prefill M. Each layer is
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
import sys
import time

import torch
import torch.nn.functional as F

from meshserve.kernels import native
from meshserve.kernels.bf16_gemm import bf16_linear, brgemm_linear, pack_bf16_pairs, pack_bf16_panels
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
KERNELS = ("bf16_fma", "dpbf16", "int8", "int4")  # the default set (decode)
ALL_KERNELS = (*KERNELS, "brgemm", "int8/tiles", "int4/tiles", "int8/brgemm", "int4/brgemm")
BRGEMM_ROWS = {"tiles": sys.maxsize, "brgemm": 0}  # quant_linear's brgemm_rows forcing one path


def random_weight(kernel: str, n: int, k: int, gen: torch.Generator):
    """One packed weight of the kernel's kind and its packed bytes."""
    if kernel in ("bf16_fma", "dpbf16", "brgemm"):
        pack = pack_bf16_panels if kernel == "brgemm" else pack_bf16_pairs
        packed = pack((torch.randn(n, k, generator=gen) * 0.02).bfloat16())
        return packed, packed.numel() * 2
    if kernel.startswith("int8"):
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
    if kernel == "brgemm":
        return brgemm_linear(x, packed, n, None, True)
    path = kernel.partition("/")[2]
    return quant_linear(x, packed, brgemm_rows=BRGEMM_ROWS[path] if path else None)


def check(kernel: str, packed, n: int, k: int) -> None:
    """The kernel against its oracle on a few rows (small weights stand in for the big ones' layout)."""
    x = torch.randn(3, k).bfloat16()
    y = run(kernel, packed, n, x, x.float()).float()
    if kernel.startswith("int"):
        ref = quant_linear_reference(x.float(), unpack_quant(packed))
    else:
        cols = packed.shape[2] // 2  # 16 (pairs) or 64 (brgemm panels)
        w = packed.view(packed.shape[0], -1, cols, 2).permute(0, 2, 1, 3).reshape(-1, packed.shape[1] * 2)
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
    parser.add_argument("--kernels", nargs="+", choices=ALL_KERNELS, default=list(KERNELS))
    parser.add_argument("--pass-mib", type=int, default=PASS_BYTES >> 20, help="weight bytes per timed pass")
    args = parser.parse_args()
    kernels = args.kernels
    if not native.load():
        raise SystemExit(f"native kernels not built: run `{native.BUILD_COMMAND}`")
    roof = read_roofline(args.threads)
    print(f"read roofline (1 GiB tensor sum, {args.threads} threads): {roof:.1f} GB/s")
    gen = torch.Generator().manual_seed(0)
    seconds: dict[tuple[str, str, int], float] = {}
    for layer in args.layers:
        n, k = SHAPES[layer]
        print(f"\n{layer} {n}x{k}: us per call / weight GB/s / % of roofline")
        print(f"{'M':>5s} " + "".join(f"{name:>26s}" for name in kernels))
        rows: dict[int, list[str]] = {m: [] for m in args.m}
        for kernel in kernels:
            small, _ = random_weight(kernel, 48, k, gen)
            check(kernel, small, 48, k)
            first, nbytes = random_weight(kernel, n, k, gen)
            copies = [first] + [
                random_weight(kernel, n, k, gen)[0] for _ in range((args.pass_mib << 20) // nbytes)
            ]
            for m in args.m:
                t = time_layer(kernel, copies, n, k, m, args.repeats, gen)
                seconds[(layer, kernel, m)] = t
                gbs = nbytes / t / 1e9
                rows[m].append(f"{t * 1e6:10.1f} /{gbs:6.1f} /{100 * gbs / roof:4.0f}%")
            del copies, first
        for m in args.m:
            print(f"{m:5d} " + "".join(f"{cell:>26s}" for cell in rows[m]), flush=True)
    if set(args.layers) == set(SHAPES) and any(not kern.startswith("int") for kern in kernels):
        print(f"\n1B decode step ({DECODER_LAYERS} x (qkv + o + gate_up + down) + lm_head): tok/s (x bf16)")
        for m in args.m:
            step = {
                kern: DECODER_LAYERS * sum(seconds[(lay, kern, m)] for lay in ("qkv", "o", "gate_up", "down"))
                + seconds[("lm_head", kern, m)]
                for kern in kernels
            }
            bf16 = min(s for kern, s in step.items() if not kern.startswith("int"))
            cells = "  ".join(f"{kern} {m / s:8.1f} ({bf16 / s:4.2f}x)" for kern, s in step.items())
            print(f"M={m:3d}  {cells}")


if __name__ == "__main__":
    main()
