"""The quantized tiles' compute cost with the weight hot in L2: one thread, the best of 400 calls (a minimum,
so a busy machine slows it little), int8 and int4 quant_linear at decode M on a 512 x 2048 weight.

    flock /tmp/bench.lock python benchmarks/quant_hot.py

At batch 1 the tiles should be read-bound from DRAM; this says how fast each runs when the read is free (run
it on two builds, MESHSERVE_BUILD_DIR and PYTHONPATH per tree, to compare a tile change).
"""

from __future__ import annotations

import time

import torch

from meshserve.kernels.quant_gemm import pack_quant, quant_linear
from meshserve.kernels.quant_weight import quantize_int4, quantize_int8

N, K, CALLS = 512, 2048, 400


def main() -> None:
    torch.set_num_threads(1)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    for name, q in (("int8", quantize_int8(w)), ("int4", quantize_int4(w, 128))):
        packed = pack_quant(q)
        for m in (1, 2, 4):
            x = torch.randn(m, K).bfloat16()
            for _ in range(20):
                quant_linear(x, packed)
            best = float("inf")
            for _ in range(CALLS):
                start = time.perf_counter()
                quant_linear(x, packed)
                best = min(best, time.perf_counter() - start)
            gbs = packed.qweight.numel() / best / 1e9
            print(f"{name} M={m}: {best * 1e6:7.1f} us, {gbs:5.1f} GB/s of packed integers")


if __name__ == "__main__":
    main()
