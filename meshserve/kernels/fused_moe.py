"""The native fused MoE operator (kernels/csrc/moe.cpp): weight packing, the call, and its torch oracle.

`torch.ops.meshserve.fused_moe(x, topk_ids, topk_weights, w13, w2)` runs every routed expert of a step in
one call: pairs sorted by expert, float32 accumulation, SiLU-mul and the routing-weight combine fused.
Weights are packed once (``pack_experts``) into 64-column blocks laid out the way its micro-kernels read
them (bfloat16: the shared pair layout of csrc/bf16_dot_tile.h). ``moe_reference`` computes the same
thing with plain torch ops. ``fused_route`` is the native router (kernels/csrc/moe_router.cpp): gate logits,
softmax, top-k, renormalisation and per-expert counts in one call; SparseMoE.route is its oracle.
"""

from __future__ import annotations

import json
import math
import sys
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from meshserve import switches
from meshserve.kernels import native
from meshserve.kernels.bf16_gemm import BLOCK_COLS, pack_bf16_pairs
from meshserve.kernels.cpu import isa_tag

COLS = 64  # output columns per packed block (csrc/moe.cpp kCols); gate_up blocks hold 32 gate + 32 up


LIMITS = Path(__file__).parent / "profiles" / "moe.json"


@cache
def fused_max_tokens(dtype: torch.dtype) -> int:
    """Largest step (tokens) the op serves in this dtype (profiles/moe.json); no limit when not listed."""
    limits = json.loads(LIMITS.read_text())["fused_max_tokens"]
    return int(limits.get(str(dtype).removeprefix("torch."), sys.maxsize))


@cache
def _brgemm_min_tokens(isa: str) -> int:
    return int(json.loads(LIMITS.read_text())["brgemm_min_tokens"].get(isa, sys.maxsize))


def brgemm_min_tokens() -> int:
    """Smallest bfloat16 step the op runs through oneDNN's brgemm (profiles/moe.json, keyed by this CPU's
    ISA tag: always on AMX, where it runs AMX tiles; MESHSERVE_AMX=off makes an AMX machine an avx512_bf16
    one)."""
    return _brgemm_min_tokens(isa_tag())


def use_fused_moe(dtype: torch.dtype, hidden_size: int) -> bool:
    """The native op serves float32 and bfloat16 (even hidden size) unless MESHSERVE_MOE=reference."""
    if switches.value("MESHSERVE_MOE") == "reference":
        return False
    supported = dtype == torch.float32 or (dtype == torch.bfloat16 and hidden_size % 2 == 0)
    return supported and native.load()


def _pack_blocks(w: torch.Tensor) -> torch.Tensor:
    """[E, N, K] (N a multiple of COLS) -> COLS-column blocks: float32 [E, N/COLS, K, COLS]; bfloat16 in the
    pair layout of csrc/bf16_dot_tile.h (``pack_bf16_pairs``: 16 columns per block, each k-pair of a column
    side by side), four such blocks per COLS columns: [E, N/COLS, 4 * K/2, 32]."""
    e, n, k = w.shape
    if w.dtype == torch.float32:
        return w.reshape(e, n // COLS, COLS, k).permute(0, 1, 3, 2).contiguous()
    per_block = COLS // BLOCK_COLS * (k // 2)
    packed = torch.stack([pack_bf16_pairs(expert) for expert in w])  # once per layer, at load
    return packed.reshape(e, n // COLS, per_block, 2 * BLOCK_COLS)


def pack_experts(gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked expert weights gate_up [E, 2I, H] ([gate; up]) and down [E, H, I] in the op's layout.

    I is zero-padded to a multiple of 32 and H (down's output) to a multiple of COLS; padded gate and up
    columns give SiLU(0) * 0 = 0, and padded down columns are never read back. Experts are packed one at a
    time into the output (a load-time loop), so the temporaries are one expert's, not the layer's: a model's
    load peaks at its weights plus one layer's packed copy.
    """
    e, two_i, h = gate_up.shape
    shapes = [
        p.shape for p in _pack_expert(*(w.new_empty(w.shape[1:], device="meta") for w in (gate_up, down)))
    ]
    out = tuple(torch.empty(e, *s, dtype=gate_up.dtype, device=gate_up.device) for s in shapes)
    if not gate_up.is_meta:
        for x in range(e):
            for o, p in zip(out, _pack_expert(gate_up[x], down[x]), strict=True):
                o[x] = p
    return out


def pack_experts_in_place(gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_experts written over the weights' own storage, expert by expert, where an expert's blocks take
    exactly its weights' bytes (I a multiple of 32, H of COLS; row- or column-major experts): packing then
    needs one expert's temporaries, not a second copy of the layer. The weights are garbage afterwards:
    the caller drops them. A weight that does not fit its blocks is packed into a new tensor."""
    shapes = [
        p.shape for p in _pack_expert(*(w.new_empty(w.shape[1:], device="meta") for w in (gate_up, down)))
    ]
    out = []
    for w, shape in zip((gate_up, down), shapes, strict=True):
        e, n, k = w.shape
        dense = w.stride(0) == n * k and w.stride()[1:] in ((k, 1), (1, n))  # each expert one slab
        if dense and math.prod(shape) == n * k:
            out.append(w.new_empty(0).set_(w.untyped_storage(), w.storage_offset(), (e, *shape)))
        else:
            out.append(w.new_empty(e, *shape))
    for x in range(gate_up.shape[0]):  # expert x's blocks replace expert x's weights, read just before
        for o, p in zip(out, _pack_expert(gate_up[x], down[x]), strict=True):
            o[x] = p
    return out[0], out[1]


def _pack_expert(gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert: gate_up [2I, H] with gate and up interleaved per 32 columns, then both in blocks."""
    two_i, h = gate_up.shape
    i = two_i // 2
    half = COLS // 2
    i_pad, h_pad = -(-i // half) * half, -(-h // COLS) * COLS
    gate, up = (
        F.pad(w, (0, 0, 0, i_pad - i)).reshape(i_pad // half, half, h) for w in (gate_up[:i], gate_up[i:])
    )
    interleaved = torch.stack((gate, up), dim=1).reshape(1, 2 * i_pad, h)
    return _pack_blocks(interleaved)[0], _pack_blocks(F.pad(down, (0, i_pad - i, 0, h_pad - h))[None])[0]


def fused_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    packed: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for x [T, H]; weights from pack_experts.

    bfloat16 steps of at least ``brgemm_min_tokens()`` tokens run the op's brgemm path: oneDNN's
    micro-kernel (AMX tiles on AMX machines), on the same packed weights."""
    ids, weights = topk_ids.contiguous(), topk_weights.float().contiguous()
    brgemm = x.dtype == torch.bfloat16 and x.shape[0] >= brgemm_min_tokens()
    return torch.ops.meshserve.fused_moe(x.contiguous(), ids, weights, *packed, brgemm)


def fused_route(
    x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing weights [T, k] (float32), expert ids [T, k] and pairs per expert [E] for tokens x [T, H]."""
    return torch.ops.meshserve.moe_route(x.contiguous(), gate_weight.contiguous(), top_k, renormalize)


def moe_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """The op's oracle: a loop over experts in float32, rounding the SiLU-mul activations and the result to
    x's dtype where the op does."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    i = down.shape[2]
    for e in range(gate_up.shape[0]):
        token, choice = torch.nonzero(topk_ids == e, as_tuple=True)
        h = x[token].float() @ gate_up[e].float().T
        act = (F.silu(h[:, :i]) * h[:, i:]).to(x.dtype).float()
        out.index_add_(0, token, (act @ down[e].float().T) * topk_weights[token, choice, None].float())
    return out.to(x.dtype)


def _fused_moe_fake(x, topk_ids, topk_weights, w13, w2, brgemm=False):
    return torch.empty_like(x)


def _moe_route_fake(x, gate_w, top_k, renormalize):
    t, e = x.shape[0], gate_w.shape[0]
    return (
        x.new_empty(t, top_k, dtype=torch.float32),
        x.new_empty(t, top_k, dtype=torch.long),
        x.new_empty(e, dtype=torch.long),
    )


def register_fake() -> None:
    """Give the ops (just loaded by native.load) their shape functions, for torch.compile and fake tensors."""
    torch.library.register_fake("meshserve::fused_moe", _fused_moe_fake)
    torch.library.register_fake("meshserve::moe_route", _moe_route_fake)
