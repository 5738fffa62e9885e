"""Weight-only int8 / int4 linears and MoE experts that dequantize in registers (kernels/csrc/quant_*.cpp).

``pack_quant`` reorders a ``QuantWeight`` once per layer into the layout the kernels stream; nothing else
is kept (no float or bfloat16 copy), so a layer's resident bytes are its packed integers, scales, zeros
and permutation. ``quant_linear`` is y = x @ W.T (+ bias); ``quant_moe`` is ``fused_moe`` over quantized
experts. ``quant_linear_reference`` (kernels/quant_weight.py) and ``quant_moe_reference`` are the oracles.

Packed layout (why: one 64-byte load is one unit of 16 output columns, the columns' lanes side by side,
the way the register tile of csrc/quant_tile.h broadcasts an activation against them):
- K is split into the QuantWeight's groups; each group is zero-padded to a whole number of units of
  UNIT_K[bits] k (4 for int8, 8 for int4) -- a no-op for group sizes that are multiples of 8.
- ``qweight`` [..., ceil(N/16), units, 64]: per block of 16 output columns and per unit, 16 x 32-bit
  lanes, lane c holding column c's UNIT_K values (int8: 4 bytes, k in byte order; int4: 8 nibbles from the
  low one holding k 0, 2, 4, 6, 1, 3, 5, 7, so one shift puts k 2p and 2p + 1 in the lane's two 16-bit
  halves: csrc/quant_tile.h's bfloat16 pair tile). N is zero-padded to a multiple of 16.
- ``scales`` float32 [..., ceil(N/16), G, 16] and ``zeros`` (the QuantWeight's dtype, or None) alike.
- ``perm`` as the QuantWeight's (act-order): the kernels apply it to x.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from meshserve.kernels import native
from meshserve.kernels.cpu import isa_tag
from meshserve.kernels.quant_weight import QuantWeight, pack_int4, quant_linear_reference, unpack_int4

BLOCK_COLS = 16  # output columns per packed block (csrc/quant_tile.h kBlockCols)
UNIT_K = {8: 4, 4: 8}  # k per 32-bit lane of a unit
NIBBLE_K = [0, 2, 4, 6, 1, 3, 5, 7]  # the k each nibble of an int4 lane holds (csrc nibble_slot)
K_NIBBLE = [0, 4, 1, 5, 2, 6, 3, 7]  # the nibble holding each k
PATHS = Path(__file__).parent / "profiles" / "quant.json"


@dataclass
class PackedQuant:
    """A QuantWeight in the kernels' layout (module docstring). Leading dims of the tensors are experts:
    ``select`` takes some, and a migration moves ``tensors()`` as they are."""

    bits: int
    out_features: int
    in_features: int
    group_size: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        """The tensors that hold the weight (what moves between processes), in field order."""
        return [t for t in (self.qweight, self.scales, self.zeros, self.perm) if t is not None]

    def select(self, index: torch.Tensor | int) -> PackedQuant:
        """The experts ``index`` of a stacked weight (tensors indexed along their first dim)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("qweight", "scales", "zeros", "perm"):
            if kw[name] is not None:
                kw[name] = kw[name][index]
        return PackedQuant(**kw)


def _group_padded(k: int, group_size: int, bits: int) -> int:
    """k of one group in the packed layout: group_size rounded up to a whole unit."""
    unit = UNIT_K[bits]
    return -(-group_size // unit) * unit


def pack_quant(w: QuantWeight) -> PackedQuant:
    """The kernels' layout of ``w`` (module docstring); made once per layer at prepare."""
    n, k, gs, bits = w.out_features, w.in_features, w.group_size, w.bits
    lead, groups, unit = w.qweight.shape[:-2], k // gs, UNIT_K[bits]
    gp, nb = _group_padded(k, gs, bits), -(-n // BLOCK_COLS)
    q = unpack_int4(w.qweight) if bits == 4 else w.qweight
    q = q.unflatten(-1, (groups, gs))
    q = F.pad(q, (0, gp - gs, 0, 0, 0, nb * BLOCK_COLS - n))  # [..., nb*16, G, gp]
    q = q.unflatten(-3, (nb, BLOCK_COLS)).unflatten(-1, (gp // unit, unit))  # [..., nb, 16, G, U, unit]
    q = q.movedim(-4, -2)  # [..., nb, G, U, 16, unit]
    if bits == 4:
        q = pack_int4(q[..., NIBBLE_K])  # 8 nibbles -> 4 bytes per lane
    qweight = q.reshape(*lead, nb, groups * gp // unit, 64).contiguous()

    def blocked(t: torch.Tensor) -> torch.Tensor:  # [..., N, G] -> [..., nb, G, 16]
        t = F.pad(t, (0, 0, 0, nb * BLOCK_COLS - n)).unflatten(-2, (nb, BLOCK_COLS))
        return t.transpose(-1, -2).contiguous()

    zeros = None if w.zeros is None else blocked(w.zeros)
    perm = None if w.perm is None else w.perm.to(torch.int64).contiguous()
    return PackedQuant(bits, n, k, gs, qweight, blocked(w.scales.float()), zeros, perm)


def unpack_quant(p: PackedQuant) -> QuantWeight:
    """The QuantWeight ``p`` was packed from (the oracles' input; a test's round trip)."""
    n, k, gs, bits = p.out_features, p.in_features, p.group_size, p.bits
    groups, unit = k // gs, UNIT_K[bits]
    gp, nb = _group_padded(k, gs, bits), p.qweight.shape[-3]
    lead = p.qweight.shape[:-3]
    q = p.qweight.unflatten(-1, (BLOCK_COLS, 4))  # [..., nb, G*U, 16, 4 bytes]
    if bits == 4:
        q = unpack_int4(q)[..., K_NIBBLE]  # [..., nb, G*U, 16, 8]
    q = q.unflatten(-3, (groups, gp // unit)).movedim(-2, -4)  # [..., nb, 16, G, U, unit]
    q = q.reshape(*lead, nb * BLOCK_COLS, groups, gp)[..., :n, :, :gs].reshape(*lead, n, k)

    def unblocked(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(-1, -2).reshape(*lead, nb * BLOCK_COLS, groups)[..., :n, :]

    zeros = None if p.zeros is None else unblocked(p.zeros)
    qweight = pack_int4(q) if bits == 4 else q
    return QuantWeight(bits, qweight.contiguous(), unblocked(p.scales), zeros, gs, p.perm)


def dequantize_rows(p: PackedQuant, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` [T] of W [N, K] as float32 [T, K], read from the packed layout (a tied quantized lm_head
    serving as the input embedding: only the looked-up rows are unpacked). Equal to dequantize(W)[rows]."""
    k, gs, bits = p.in_features, p.group_size, p.bits
    groups = k // gs
    block, lane = rows // BLOCK_COLS, rows % BLOCK_COLS
    q = p.qweight.unflatten(-1, (BLOCK_COLS, 4))[block, :, lane]  # [T, G*U, 4 bytes]: each row's lane
    if bits == 4:
        q = unpack_int4(q)[..., K_NIBBLE]
    q = q.reshape(len(rows), groups, -1)[..., :gs].float()  # [T, G, gs] (the group padding dropped)
    scales = p.scales[block, :, lane][..., None]  # [T, G, 1]
    default_zero = 8.0 if bits == 4 else 0.0  # what a symmetric layer's missing zeros stand for
    zeros = default_zero if p.zeros is None else p.zeros[block, :, lane][..., None].float()
    dense = ((q - zeros) * scales).flatten(-2)
    if p.perm is None:
        return dense
    out = torch.empty_like(dense)
    out[:, p.perm] = dense  # W[:, perm[j]] = W_perm[:, j]
    return out


def native_ready() -> bool:
    """The native ops are built here (native.load warns loudly once when they are not)."""
    return native.load() and hasattr(torch.ops.meshserve, "quant_linear")


@cache
def _brgemm_rows(isa: str) -> int:
    return int(json.loads(PATHS.read_text())["brgemm_min_rows"].get(isa, sys.maxsize))


def brgemm_min_rows() -> int:
    """Fewest bfloat16 rows (a linear's M, an expert's rows) the quantized ops run through the brgemm path:
    the weight dequantized a K block at a time into a bfloat16 scratch for oneDNN's micro-kernel
    (csrc/quant_brgemm.h). profiles/quant.json, keyed by this CPU's ISA tag; a tag not listed never does."""
    return _brgemm_rows(isa_tag())


def _rows(brgemm_rows: int | None) -> int:
    if brgemm_rows is None:
        return brgemm_min_rows()
    if brgemm_rows < 0:
        raise ValueError(f"brgemm_rows must be >= 0 (0: every call takes the brgemm path), got {brgemm_rows}")
    return brgemm_rows


def _op_args(p: PackedQuant) -> tuple:
    return (p.qweight, p.scales, p.zeros, p.perm, p.bits, p.group_size, p.out_features)


def quant_linear(
    x: torch.Tensor, packed: PackedQuant, bias: torch.Tensor | None = None, brgemm_rows: int | None = None
) -> torch.Tensor:
    """y = x @ W.T (+ bias) [M, N] in x's dtype for x bfloat16 or float32 [M, K]; float32 sums.
    ``brgemm_rows``: M from which bfloat16 x takes the brgemm path (None: ``brgemm_min_rows()``)."""
    if x.dim() != 2 or x.shape[1] != packed.in_features:
        raise ValueError(f"x must be [M, {packed.in_features}] (in_features), got {tuple(x.shape)}")
    rows = _rows(brgemm_rows)
    if native_ready():
        return torch.ops.meshserve.quant_linear(x, *_op_args(packed), bias, rows)
    return quant_linear_reference(x, unpack_quant(packed), bias)


def quant_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: PackedQuant,
    w2: PackedQuant,
    brgemm_rows: int | None = None,
) -> torch.Tensor:
    """``fused_moe`` over quantized experts: sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for x
    [T, H], each expert down(SiLU(gate(x)) * up(x)) with w13 [E, 2I, H] ([gate; up]) and w2 [E, H, I].
    ``brgemm_rows``: an expert's rows from which bfloat16 x takes the brgemm path (None: this CPU's)."""
    if w13.out_features != 2 * w2.in_features or w13.in_features != w2.out_features:
        raise ValueError(
            f"w13 must be [E, 2I, H] and w2 [E, H, I]: got w13 out/in {w13.out_features}/{w13.in_features}, "
            f"w2 out/in {w2.out_features}/{w2.in_features}"
        )
    if x.dim() != 2 or x.shape[1] != w13.in_features:
        raise ValueError(f"x must be [T, {w13.in_features}] (hidden size), got {tuple(x.shape)}")
    ids, weights = topk_ids.to(torch.int64).contiguous(), topk_weights.float().contiguous()
    rows = _rows(brgemm_rows)
    if native_ready():
        args = (x.contiguous(), ids, weights, *_op_args(w13), *_op_args(w2), rows)
        return torch.ops.meshserve.quant_moe(*args)
    return quant_moe_reference(x, ids, weights, unpack_quant(w13), unpack_quant(w2))


def quant_moe_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: QuantWeight,
    w2: QuantWeight,
) -> torch.Tensor:
    """The expert op's oracle from quant_linear_reference: a loop over experts in float32, rounding the
    SiLU-mul activations and the result to x's dtype where the op does (as fused_moe's moe_reference)."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    inter = w2.in_features
    for e in range(w13.qweight.shape[0]):
        token, choice = torch.nonzero(topk_ids == e, as_tuple=True)
        if len(token) == 0:
            continue
        h = quant_linear_reference(x[token].float(), _expert(w13, e))
        act = (F.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype).float()
        y = quant_linear_reference(act, _expert(w2, e))
        out.index_add_(0, token, y * topk_weights[token, choice, None].float())
    return out.to(x.dtype)


def _expert(w: QuantWeight, e: int) -> QuantWeight:
    pick = lambda t: None if t is None else t[e]  # noqa: E731
    return QuantWeight(w.bits, w.qweight[e], w.scales[e], pick(w.zeros), w.group_size, pick(w.perm))


def _quant_linear_fake(x, qweight, scales, zeros, perm, bits, group_size, n, bias=None, brgemm_rows=None):
    return x.new_empty(x.shape[0], n)


def _quant_moe_fake(x, topk_ids, topk_weights, *weights):
    return torch.empty_like(x)


def register_fake() -> None:
    """Shape functions of the ops (just loaded by native.load), for torch.compile and fake tensors."""
    torch.library.register_fake("meshserve::quant_linear", _quant_linear_fake)
    torch.library.register_fake("meshserve::quant_moe", _quant_moe_fake)
