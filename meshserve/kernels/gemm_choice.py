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
