"""One resident layout per linear layer, whatever GEMM table is active (DESIGN.md: one copy of every weight).

Each SmoothGEMM primitive reads one layout of the weight [N, K]:

    linear -> "weight" (as loaded)      packed -> "packed" (oneDNN's blocked layout, model dtype)
    packed_f32 -> "packed_f32" (oneDNN's, float32; "packed" for a float32 layer)
    bf16_fma, dpbf16 -> "pairs"         brgemm -> "panels"       (kernels/bf16_gemm.py)

A table measured per M may pick primitives on several layouts for one shape; keeping each one's copy held
up to four copies of the weights (3.1x them for a 1B model on a 2-core avx512_bf16 machine). The plan keeps
ONE layout: the one the table picks at M = 1. Batch-1 decode reads every weight once per token, so the
layout decides its speed most (the first rule, the layout most picked over M = 1..max_num_seqs weighted
1/M, kept F.linear's loaded weight for most 1B Llama layers: docs/gemm.md, figures in docs/kernels.md).
Except where M = 1 picks F.linear on the loaded weight: that pick says only that no prepared layout beats
a plain GEMV there (by a little, as a rule), while a prepared layout the larger decode batches pick wins by
much, so the weighted vote over M = 1..decode_m decides (float32 toy models: F.linear at M = 1, oneDNN's
packed layout at most M above it).
Every M whose table choice reads another layout runs the table's choice at the nearest M that reads
the kept layout, else that layout's own primitive (DEFAULT). The loaded weight is dropped unless it is the
layout kept.

Extra layouts cost memory only with an explicit byte budget (EngineConfig.kernel_memory_budget, default 0):
the other layouts the table picks, most-used first, while they fit. A float32 layout of a bfloat16 layer is
a copy twice the weight's size, so it needs the budget too; without it the layer keeps "packed" (the same
oneDNN kernel in the model dtype). Padding to a kernel's block (pairs: N to 16, panels: N to 64) is part of
the one layout, not an extra copy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from meshserve.kernels.bf16_gemm import BLOCK_COLS, PANEL_COLS
from meshserve.kernels.gemm_choice import GemmChoice

READS = {
    "linear": "weight",
    "packed": "packed",
    "packed_f32": "packed_f32",
    "bf16_fma": "pairs",
    "dpbf16": "pairs",
    "brgemm": "panels",
}
# The primitive that serves any M on a layout when the table never picks one reading it there.
# pairs: the FMA tile is faster than dpbf16 from two rows on (kernels/bf16_gemm.py).
DEFAULT = {
    "weight": GemmChoice("linear"),
    "packed": GemmChoice("packed"),
    "packed_f32": GemmChoice("packed_f32"),
    "pairs": GemmChoice("bf16_fma"),
    "panels": GemmChoice("brgemm"),
}


ROW_LAYOUTS = ("weight", "pairs", "panels")  # layouts whose rows can be read back (weight_rows)


def layout_of(choice: GemmChoice, dtype: torch.dtype) -> str:
    """The weight layout ``choice`` reads on a layer of ``dtype``."""
    layout = READS[choice.kernel]
    return "packed" if layout == "packed_f32" and dtype == torch.float32 else layout


def layout_bytes(layout: str, n: int, k: int, dtype: torch.dtype, bias: bool) -> int:
    """Bytes one layout of a [n, k] weight holds (with the float32 bias packed_f32 keeps beside it)."""
    if layout == "pairs":
        return -(-n // BLOCK_COLS) * BLOCK_COLS * -(-k // 2) * 4
    if layout == "panels":
        return -(-n // PANEL_COLS) * PANEL_COLS * -(-k // 2) * 4
    if layout == "packed_f32":
        return n * k * 4 + (n * 4 if bias else 0)
    return n * k * dtype.itemsize


def weight_rows(layout: str, packed: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Rows ``ids`` of a [N, k] weight kept as ``layout`` ("pairs" or "panels"): an embedding lookup of a
    tied lm_head. Each row's k-pairs sit in its column of a [blocks, k/2, cols, 2] array."""
    cols = BLOCK_COLS if layout == "pairs" else PANEL_COLS
    blocks = packed.view(packed.shape[0], packed.shape[1], cols, 2)
    return blocks[ids // cols, :, ids % cols].reshape(*ids.shape, -1)[..., :k]


@dataclass(frozen=True)
class LayoutPlan:
    """What a linear keeps: its layouts (the first is the one every M can run) and the choice per M."""

    by_m: list[GemmChoice]
    layouts: tuple[str, ...]
    extra_bytes: int  # bytes kept beyond the loaded weight (negative never: the weight's own size is freed)
    budget_used: int  # of those, the bytes the kernel memory budget paid for


def _budget_cost(layout: str, n: int, k: int, dtype: torch.dtype, bias: bool, primary: bool) -> int:
    """Budget a layout needs: a second layout all of it; the one kept only what a float32 copy adds."""
    size = layout_bytes(layout, n, k, dtype, bias)
    if not primary:
        return size
    return size - n * k * dtype.itemsize if layout == "packed_f32" else 0


def plan_layouts(
    by_m: list[GemmChoice],
    n: int,
    k: int,
    dtype: torch.dtype,
    bias: bool = False,
    budget: int = 0,
    rows_read: bool = False,
    *,
    decode_m: int = 1,
) -> LayoutPlan:
    """The layouts a [n, k] linear keeps for the table's choices ``by_m`` (index = M) and what each M runs.

    ``rows_read``: the weight's rows are read elsewhere too (an lm_head tied to the embedding), so the
    layout kept must give them back (ROW_LAYOUTS): the first M's from 1 up that gives them, else the weight
    as loaded. ``budget``: bytes this layer may spend on extra layouts. ``decode_m``: the largest decode
    batch (max_num_seqs), the M that vote when M = 1 picks the loaded weight."""
    if not by_m:
        raise ValueError("by_m must list a choice for M = 0 at least")
    layouts = [layout_of(c, dtype) for c in by_m]
    from_one = layouts[1:] or layouts
    allowed = [lay for lay in from_one if lay in ROW_LAYOUTS] if rows_read else from_one
    primary = allowed[0] if allowed else "weight"
    if primary == "weight":  # M weighted 1/M: every doubling of the batch counts alike, M = 1 most
        votes: Counter[str] = Counter()
        for m, layout in enumerate(from_one[:decode_m], start=1):
            if layout in allowed:
                votes[layout] += 1 / m
        primary = max(votes, key=votes.__getitem__, default=primary)  # a tie goes to the first seen
    if _budget_cost(primary, n, k, dtype, bias, True) > budget:
        primary = "packed"  # the float32 copy does not fit: oneDNN's kernel in the model dtype
    used = _budget_cost(primary, n, k, dtype, bias, True)
    kept = [primary]
    for layout, _ in Counter(lay for lay in layouts if lay != primary).most_common():
        cost = _budget_cost(layout, n, k, dtype, bias, False)
        if used + cost <= budget:
            kept.append(layout)
            used += cost
    out = [c if lay in kept else DEFAULT[primary] for c, lay in zip(by_m, layouts, strict=True)]
    on_kept = np.flatnonzero(np.array(layouts) == primary)
    moved = np.flatnonzero(~np.isin(layouts, kept))
    if on_kept.size and moved.size:  # the table's choice at the nearest M that reads the kept layout
        right = np.searchsorted(on_kept, moved).clip(max=on_kept.size - 1)
        left = (right - 1).clip(min=0)
        nearest = np.where(
            moved - on_kept[left] <= np.abs(on_kept[right] - moved), on_kept[left], on_kept[right]
        )
        for m, j in zip(moved.tolist(), nearest.tolist(), strict=True):
            out[m] = by_m[j]
    weight = n * k * dtype.itemsize
    held = sum(layout_bytes(lay, n, k, dtype, bias) for lay in kept)
    return LayoutPlan(out, tuple(kept), held - weight, used)
