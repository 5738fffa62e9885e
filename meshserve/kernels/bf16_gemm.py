"""The native bfloat16-weight linear (kernels/csrc/bf16_linear.cpp over the tile in csrc/bf16_dot_tile.h).

`torch.ops.meshserve.bf16_linear(x, packed, n, bias=None, out_f32=False, dpbf16=False)` computes
x @ W.T (+ bias) for a bfloat16 weight W [n, K] packed once by ``pack_bf16_pairs``; x is bfloat16, or float32
holding bfloat16 values (what the fused ops hand a float32 GEMM). The result is float32 (``out_f32``) or
bfloat16. ``dpbf16`` picks the tile: False widens the weight to float32 in registers and runs FMAs
("bf16_fma"), True runs AVX512-BF16 dot products on bfloat16 activations; on this machine kind vdpbf16ps
has half the FMA's flop rate, so the FMA tile is the faster one from two rows on (docs/kernels.md).
``bf16_linear_reference`` is the oracle: F.linear in float32 of the same values.

`torch.ops.meshserve.brgemm_linear(x, panels, n, bias=None, out_f32=False)` (csrc/brgemm_linear.cpp)
computes the same through PyTorch's oneDNN micro-kernel (AMX tiles where the CPU has them, AVX-512
elsewhere) on the weight packed by ``pack_bf16_panels``; the same oracle holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meshserve.kernels import native

BLOCK_COLS = 16  # output columns per packed block (csrc/bf16_dot_tile.h kBlockCols)
PANEL_COLS = 64  # output columns per brgemm panel (csrc/brgemm_linear.cpp kPanelCols)
SCRATCH_BYTES = 32 << 20  # _vnni_in_place: blocks staged at once


def _vnni(weight: torch.Tensor, cols: int) -> torch.Tensor:
    """W [N, K] -> [ceil(N/cols), ceil(K/2), 2 cols] bfloat16: per block of ``cols`` output columns and
    k-pair, the columns' (w[k], w[k+1]) side by side. N and K are zero-padded; where no padding is needed
    the permute reads the weight itself, so packing holds one extra copy at a time, not two (a 1B model's
    tied lm_head is 500 MiB)."""
    n, k = weight.shape
    nb, k2 = -(-n // cols), -(-k // 2)
    padded = weight
    if (nb * cols, 2 * k2) != (n, k) or weight.dtype != torch.bfloat16:
        padded = weight.new_zeros(nb * cols, 2 * k2, dtype=torch.bfloat16)
        padded[:n, :k] = weight
    return padded.reshape(nb, cols, k2, 2).permute(0, 2, 1, 3).reshape(nb, k2, 2 * cols).contiguous()


def _vnni_in_place(weight: torch.Tensor, cols: int) -> torch.Tensor | None:
    """``_vnni`` written over the weight's own storage, or None where it needs padding (N not a multiple of
    ``cols``, K odd) or the weight is not contiguous bfloat16. Block b of the layout takes the bytes of
    rows b*cols..(b+1)*cols-1, so each run of blocks is staged through one scratch of at most SCRATCH_BYTES
    and written back over itself: packing a 1B model's 500 MiB tied lm_head holds no second copy, and the
    scratch is the only allocation. The weight's values are gone afterwards: the caller drops it."""
    n, k = weight.shape
    if n % cols or k % 2 or weight.dtype != torch.bfloat16 or not weight.is_contiguous():
        return None
    nb, k2 = n // cols, k // 2
    source = weight.view(nb, cols, k2, 2).permute(0, 2, 1, 3)  # [nb, k2, cols, 2], the layout's order
    out = weight.view(nb, k2, cols, 2)
    block = cols * k
    step = max(1, SCRATCH_BYTES // (block * weight.element_size()))
    # one size for every layer, above glibc's largest mmap threshold: mapped and unmapped whole, so the
    # scratches of a model's many layers leave no holes in the heap
    flat = torch.empty(max(step * block, SCRATCH_BYTES // weight.element_size()), dtype=weight.dtype)
    for b in range(0, nb, step):  # read a run of blocks whole before writing over it
        m = min(step, nb - b)
        scratch = flat[: m * block].view(m, k2, cols, 2)
        scratch.copy_(source[b : b + m])
        out[b : b + m].copy_(scratch)
    return out.view(nb, k2, 2 * cols)


def pack_bf16_pairs(weight: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """W [N, K] -> [ceil(N/16), ceil(K/2), 32] bfloat16: per 16-column block and k-pair, the 16 columns'
    (w[k], w[k+1]) side by side (one 512-bit load per dot product). N and K are zero-padded. ``in_place``:
    over the weight's own storage where no padding is needed (_vnni_in_place), else a new tensor."""
    packed = _vnni_in_place(weight, BLOCK_COLS) if in_place else None
    return _vnni(weight, BLOCK_COLS) if packed is None else packed


def pack_bf16_panels(weight: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """W [N, K] -> [ceil(N/64), ceil(K/2), 128] bfloat16: per 64-column panel, brgemm's VNNI layout
    [K/2][64][2] (each column's k-pair side by side). N and K are zero-padded. ``in_place`` as for
    pack_bf16_pairs."""
    packed = _vnni_in_place(weight, PANEL_COLS) if in_place else None
    return _vnni(weight, PANEL_COLS) if packed is None else packed


def brgemm_linear(
    x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None, out_f32: bool = False
) -> torch.Tensor:
    """y = x @ W.T + bias [M, n] through oneDNN's brgemm micro-kernel (csrc/brgemm_linear.cpp)."""
    if not native.load():
        raise RuntimeError(f"meshserve native kernels are not built here: run `{native.BUILD_COMMAND}`")
    return torch.ops.meshserve.brgemm_linear(x, panels, n, bias, out_f32)


def bf16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    n: int,
    bias: torch.Tensor | None = None,
    out_f32: bool = False,
    dpbf16: bool = False,
) -> torch.Tensor:
    """y = x @ W.T + bias [M, n] through the native op (loaded on first use)."""
    if not native.load():
        raise RuntimeError(f"meshserve native kernels are not built here: run `{native.BUILD_COMMAND}`")
    return torch.ops.meshserve.bf16_linear(x, packed, n, bias, out_f32, dpbf16)


def bf16_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out_f32: bool = False
) -> torch.Tensor:
    """The oracle: the bfloat16 values in float32 through F.linear (exact products, float32 sums)."""
    y = F.linear(x.to(torch.bfloat16).float(), weight.float(), None if bias is None else bias.float())
    return y if out_f32 else y.to(torch.bfloat16)


def _bf16_linear_fake(
    x: torch.Tensor,
    packed: torch.Tensor,
    n: int,
    bias: torch.Tensor | None = None,
    out_f32: bool = False,
    dpbf16: bool = False,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], n, dtype=torch.float32 if out_f32 else torch.bfloat16)


def _brgemm_linear_fake(
    x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None, out_f32: bool = False
) -> torch.Tensor:
    return x.new_empty(x.shape[0], n, dtype=torch.float32 if out_f32 else torch.bfloat16)


def register_fake() -> None:
    """Shape functions of the ops (just loaded by native.load), for torch.compile and fake tensors."""
    torch.library.register_fake("meshserve::bf16_linear", _bf16_linear_fake)
    torch.library.register_fake("meshserve::brgemm_linear", _brgemm_linear_fake)
