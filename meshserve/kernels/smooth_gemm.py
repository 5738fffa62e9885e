"""SmoothGEMM: linear layers over a token count M that changes every step (XY-Serve sec. 6).

A linear layer's N and K come from the model and never change; only M (the step's tokens) does. So each
layer holds a few fixed primitives with its weight prepacked once, and a table (from the offline profile,
kernels/profile.py) says which primitive and M-tile serve each M:

- ``linear``: plain ``F.linear`` on the exact M (the reference, and always a candidate);
- ``packed``: oneDNN with the weight reordered once into its blocked layout (``mkldnn._linear_pointwise``),
  which saves the per-call weight reorder that dominates small M in bfloat16;
- ``packed_f32``: the same in float32 for a bfloat16 layer: bf16 x bf16 products are exact in float32, so
  only the summation order changes, and on CPUs without AMX the float32 kernels run up to ~2x faster than
  the bfloat16 ones at large M (oneDNN's bf16 kernel runs vdpbf16ps, which has half the FMA's rate here);
- ``bf16_fma``: meshserve's own op (kernels/bf16_gemm.py) on the bfloat16 weight pair-packed once: it
  widens the weight to float32 in registers and runs FMAs, so it reads half packed_f32's weight bytes
  (decode-sized M) at close to its FMA rate;
- ``dpbf16``: the same op on AVX512-BF16 dot products (bfloat16 activations);
- ``brgemm``: PyTorch's oneDNN micro-kernel (at::native::cpublas::brgemm) on the weight packed once in
  64-column VNNI panels: AMX tiles on CPUs with amx_bf16, AVX-512 elsewhere (kernels/bf16_gemm.py).

The native kernels need a bfloat16 layer and the built op; elsewhere a table's choice of them runs F.linear.

A tile t > 1 rounds M up to a multiple of t so the GEMM only ever sees M in {t, 2t, .., budget}: shapes
that stay cached in oneDNN. The padding is virtual: x is copied into a persistent staging buffer (the
float32 kernel needs that copy anyway; one buffer per thread) and the rows past M are whatever the buffer
held, never zeroed or written; rows of a GEMM are independent, so they cannot change the real rows, and
only the real rows are read back.
"""

from __future__ import annotations

import dataclasses
import threading

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.kernels import native
from meshserve.kernels.bf16_gemm import (
    bf16_linear,
    brgemm_linear,
    pack_bf16_pairs,
    pack_bf16_panels,
)
from meshserve.kernels.gemm_choice import (  # noqa: F401
    KERNELS,
    NATIVE_KERNELS,
    PLAIN,
    GemmChoice,
    bounded_shapes,
)
from meshserve.kernels.gemm_layout import LayoutPlan, plan_layouts, weight_rows


class StagingBuffers(threading.local):
    """Persistent [rows, K] buffers per (K, dtype), shared by every layer: the virtual-padding tiles.

    One set per thread: engines stepping in two threads (torch ops release the GIL) would otherwise copy
    their rows into the same buffer while the other's GEMM reads it."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def get(self, rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get((k, dtype))
        if buf is None or buf.shape[0] < rows:
            buf = torch.empty(max(rows, 2 * (0 if buf is None else buf.shape[0])), k, dtype=dtype)
            self._buffers[(k, dtype)] = buf
        return buf[:rows]


STAGING = StagingBuffers()


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight [N, K] in oneDNN's blocked layout, reordered once instead of in every call."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def run_choice(
    choice: GemmChoice,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor | None = None,
    packed_f32: torch.Tensor | None = None,
    bias_f32: torch.Tensor | None = None,
    out_f32: bool = False,
    pairs: torch.Tensor | None = None,
    panels: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ weight.T + bias [M, N] through ``choice``; the packed weights must exist for its kernel
    (``pairs``: pack_bf16_pairs of a bfloat16 weight, for bf16_fma and dpbf16; ``panels``:
    pack_bf16_panels, for brgemm).

    x may be float32 holding weight-dtype values (a fused op's output for a float32 GEMM); out_f32 lets a
    float32 GEMM return its float32 result for a consumer that rounds it itself (kernels/fused.py).
    """
    if choice.kernel == "brgemm":
        return brgemm_linear(x, panels, weight.shape[0], bias, out_f32)
    if choice.kernel in NATIVE_KERNELS:
        return bf16_linear(x, pairs, weight.shape[0], bias, out_f32, choice.kernel == "dpbf16")
    m, dtype = x.shape[0], weight.dtype
    f32 = choice.kernel == "packed_f32" and dtype != torch.float32
    if not f32:
        x = x.to(dtype)
    if choice.kernel == "linear":
        return F.linear(x, weight, bias)
    if choice.tile == 1 and not f32:
        return _onednn(x, packed, bias)
    if choice.tile == 1:
        out = _onednn(x.float(), packed_f32, bias_f32)
        return out if out_f32 else out.to(dtype)
    rows = -(-m // choice.tile) * choice.tile
    staged = STAGING.get(rows, x.shape[1], torch.float32 if f32 else dtype)
    staged[:m].copy_(x)  # selective read: only the real rows; rows m.. are virtual padding
    out = _onednn(staged, packed_f32 if f32 else packed, bias_f32 if f32 else bias)[:m]
    return out if f32 and out_f32 else out.to(dtype)  # selective write: only the real rows come back


def run_bmm(
    choice: GemmChoice, x: torch.Tensor, weight: torch.Tensor, weight_f32: torch.Tensor | None = None
) -> torch.Tensor:
    """Batched x [E, M, K] @ weight.transpose(1, 2) for stacked weights [E, N, K] (MoE experts).

    ``packed_f32`` runs it in float32 with ``weight_f32`` (a float32 copy made once); any other kernel
    runs torch.bmm in the model dtype.
    """
    if choice.kernel == "packed_f32" and weight_f32 is not None and x.dtype != torch.float32:
        return torch.bmm(x.float(), weight_f32.transpose(1, 2)).to(x.dtype)
    return torch.bmm(x, weight.transpose(1, 2))


def _sole_holder(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is all of its storage and nothing else (a view, a detached alias) holds it: then
    packing may write over it. A parameter shared by two modules (a tied embedding) is one tensor."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)  # private: without it, never in place
    if weight.is_meta or use_count is None:
        return False
    storage = weight.untyped_storage()
    return storage.nbytes() == weight.nbytes and use_count(storage._cdata) <= 2  # the weight and `storage`


class SmoothLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same loading) whose forward runs the primitive its table picks for M.

    Until ``prepare`` is called it is exactly ``nn.Linear``. ``prepare`` keeps one layout of the weight
    (kernels/gemm_layout.py): where it is a packed one, the loaded weight becomes a meta tensor (shape and
    dtype only). ``rows_read`` says the weight's rows are read elsewhere too (a tied lm_head's embedding,
    through ``rows``), so the layout kept must give them back.
    """

    _by_m: list[GemmChoice] | None = None
    rows_read = False

    def plan(self, by_m: list[GemmChoice], budget: int = 0, *, decode_m: int = 1) -> LayoutPlan:
        """What ``prepare`` with these arguments keeps (works on a meta-device layer: shapes only)."""
        if self.weight.dtype != torch.bfloat16 or not native.load():  # native ones need both
            by_m = [PLAIN if c.kernel in NATIVE_KERNELS else c for c in by_m]
        n, k = self.weight.shape
        bias = self.bias is not None
        plan = plan_layouts(by_m, n, k, self.weight.dtype, bias, budget, self.rows_read, decode_m=decode_m)
        return dataclasses.replace(plan, by_m=bounded_shapes(plan.by_m))

    def kept_bytes(self, by_m: list[GemmChoice], budget: int = 0, *, decode_m: int = 1) -> int:
        """Bytes ``prepare`` keeps beyond the loaded weight."""
        return self.plan(by_m, budget, decode_m=decode_m).extra_bytes

    def prepare(self, by_m: list[GemmChoice], budget: int = 0, *, decode_m: int = 1) -> LayoutPlan:
        """Use ``by_m[M]`` for M tokens (the last entry beyond its end) as far as the layouts kept allow
        (``budget``: bytes for layouts beyond the one); pack them and drop the loaded weight unless kept."""
        plan = self.plan(by_m, budget, decode_m=decode_m)
        own = len(plan.layouts) == 1 and _sole_holder(self.weight)  # the one layout may take its bytes
        w = self.weight.detach()
        if w.is_meta:  # prepared before and dropped: only the same layouts can serve again
            if set(plan.layouts) != self._layouts:
                raise RuntimeError(f"this layer keeps only {sorted(self._layouts)}; cannot repack it")
            self._by_m = plan.by_m
            return plan
        self._layouts = set(plan.layouts)
        self._pairs = pack_bf16_pairs(w, own) if "pairs" in self._layouts else None
        self._panels = pack_bf16_panels(w, own) if "panels" in self._layouts else None
        packed = "packed" in self._layouts or ("packed_f32" in self._layouts and w.dtype == torch.float32)
        self._packed = pack_weight(w) if packed else None
        f32 = "packed_f32" in self._layouts and w.dtype != torch.float32
        self._packed_f32 = pack_weight(w.float()) if f32 else None
        self._bias_f32 = None if self.bias is None or self._packed_f32 is None else self.bias.detach().float()
        self._by_m = plan.by_m
        if "weight" not in self._layouts:
            self.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), False)
        return plan

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the weight [N, K] from the layout kept (what a tied embedding looks up)."""
        if not self.weight.is_meta:
            return F.embedding(ids, self.weight)
        layout = "panels" if self._panels is not None else "pairs"
        return weight_rows(layout, self._panels if layout == "panels" else self._pairs, ids, self.in_features)

    def wants_f32(self, m: int) -> bool:
        """Whether M tokens run a float32 GEMM on this bfloat16 layer (then float32 input saves a cast)."""
        by_m = self._by_m
        if by_m is None:
            return False
        kernel = by_m[min(m, len(by_m) - 1)].kernel
        return (kernel == "packed_f32" and self._packed_f32 is not None) or kernel == "bf16_fma"

    def forward(self, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        by_m = self._by_m
        if by_m is None:
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        choice = by_m[min(x.shape[0], len(by_m) - 1)]
        return run_choice(
            choice,
            x,
            self.weight,
            self.bias,
            self._packed,
            self._packed_f32,
            self._bias_f32,
            out_f32,
            self._pairs,
            self._panels,
        )


def pad_to_bucket_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buckets: list[int]
) -> torch.Tensor:
    """Baseline of graph-capture engines: zero-pad M to the next bucket, run, drop the padded rows."""
    m = x.shape[0]
    size = next((b for b in buckets if b >= m), m)
    padded = x if size == m else torch.cat((x, x.new_zeros(size - m, x.shape[1])))
    return F.linear(padded, weight, bias)[:m]
