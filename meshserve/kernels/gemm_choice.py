"""A SmoothGEMM primitive: the kernel that runs a linear GEMM and its M-tile (kernels/smooth_gemm.py)."""

from __future__ import annotations

from dataclasses import dataclass

KERNELS = ("linear", "packed", "packed_f32", "bf16_fma", "dpbf16", "brgemm")
NATIVE_KERNELS = ("bf16_fma", "dpbf16", "brgemm")  # the ops compute any M as is: their tile is always 1


@dataclass(frozen=True)
class GemmChoice:
    """One primitive: a kernel from KERNELS and an M-tile (1 = the exact M, no padding)."""

    kernel: str
    tile: int = 1

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown GEMM kernel {self.kernel!r}; allowed: {', '.join(KERNELS)}")
        if self.tile < 1:
            raise ValueError(f"GEMM tile must be >= 1, got {self.tile}")
        if self.kernel in NATIVE_KERNELS and self.tile != 1:
            raise ValueError(f"GEMM kernel {self.kernel!r} tile must be 1, got {self.tile}")

    @property
    def name(self) -> str:
        return self.kernel if self.tile == 1 else f"{self.kernel}/t{self.tile}"


PLAIN = GemmChoice("linear")

# oneDNN keeps one primitive per GEMM shape (JIT code and scratch, ~300 KB each, up to 1,024 of them), so an
# exact-M oneDNN choice over a wide range of M grows the process a primitive per new M for the whole of a
# serving run (benchmarks/soak.py: +5% RSS over its second half, +18% after warm-up). Above EXACT_M such a
# choice rounds M up to an eighth of its power of two (8 shapes per doubling, padding under 1/8).
ONEDNN_KERNELS = ("packed", "packed_f32")
EXACT_M = 64


def bounded_shapes(by_m: list[GemmChoice]) -> list[GemmChoice]:
    """``by_m`` (index = M) with every oneDNN choice above EXACT_M tiled to at most 8 shapes per doubling."""
    return [
        GemmChoice(c.kernel, max(c.tile, 1 << ((m - 1).bit_length() - 4)))
        if m > EXACT_M and c.kernel in ONEDNN_KERNELS
        else c
        for m, c in enumerate(by_m)
    ]
