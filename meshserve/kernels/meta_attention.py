"""Attention over a paged KV cache for one flat batch mixing prefill chunks, decodes and verifies.

Torch reference for the Meta-Attention primitive: every piece of work is GEMM(QK^T) -> masked softmax
-> GEMM(PV) on a rectangular tile, whatever stage its rows come from. Two steps, split on purpose:

- `plan_attention(meta, block_size)` runs once per forward (all layers share it). It groups sequences
  into tile groups by query length (decodes together, short chunks together, long chunks together)
  and by KV length, so padding stays small, and precomputes every index and mask a layer needs.
- `paged_attention(q, k, v, kv_cache, plan, scale)` runs per layer: writes the new K/V at their slots,
  then for each tile group gathers the sequences' KV through their block tables and computes one
  masked batched softmax(QK^T)V. Loops run over the few tile groups, never over sequences or tokens.

This is the oracle: the native executor (meta_attention_native.py over attention_tiles.py's Task-Table)
must match it, and `kernels/attention.py` falls back to it where the native op is not built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # kernels stay leaves: they only read the metadata's tensors
    from meshserve.kernels.batch import BatchMetadata

# Length classes: a length goes to the first class whose bound (a power of the base) is >= it.
# Query rows: base 4 bounds a group's row padding under 4x (decodes pad nothing). KV: base 2 bounds
# the KV gathered per sequence under 2x its length; gathering KV is most of the time at decode.
_Q_CLASS_BASE = 4
_KV_CLASS_BASE = 2


@dataclass
class TileGroup:
    """Sequences whose query rows are padded to one [S, Q] tile against KV padded to [S, M]."""

    gather_rows: torch.Tensor  # int64 [S, Q]: flat query row of each tile row (padding repeats a real row)
    kv_slots: torch.Tensor  # int64 [S, M]: cache slot of KV position m of each sequence
    mask: torch.Tensor  # bool [S, Q, M]: True where the query row may attend the KV position
    out_rows: torch.Tensor  # int64 [R]: flat rows the group's real tile rows write to
    out_select: torch.Tensor  # int64 [R]: which of the S*Q tile rows are real
    head_rows: torch.Tensor | None = field(default=None)  # int64 [S*KV*M]: made by the first layer, reused


@dataclass
class AttentionPlan:
    """Everything the per-layer attention needs, built once per forward."""

    slot_mapping: torch.Tensor
    groups: list[TileGroup]
    num_tokens: int


def _tile_group(meta: BatchMetadata, seqs: torch.Tensor, block_size: int, window: int | None) -> TileGroup:
    starts = meta.query_start_loc[:-1].long()[seqs]
    q_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()[seqs]
    seq_lens = meta.seq_lens.long()[seqs]
    device = starts.device
    q_idx = torch.arange(int(q_lens.max()), device=device)
    valid = q_idx[None, :] < q_lens[:, None]
    gather_rows = starts[:, None] + torch.minimum(q_idx[None, :], q_lens[:, None] - 1)
    q_pos = (seq_lens - q_lens)[:, None] + q_idx[None, :]

    kv_pos = torch.arange(int(seq_lens.max()), device=device)
    tables = meta.block_tables.long()[seqs].clamp(min=0)  # padding (PAD_BLOCK) is read only where masked
    cols = torch.clamp(kv_pos // block_size, max=tables.shape[1] - 1)
    kv_slots = tables[:, cols] * block_size + kv_pos % block_size
    # Padded query rows repeat a real row's position, so no row is fully masked (no NaN); they are dropped.
    row_pos = torch.where(valid, q_pos, q_pos[:, :1])[:, :, None]
    mask = kv_pos[None, None, :] <= row_pos
    if window:  # sliding window: a row sees only its last `window` positions (itself included)
        mask &= kv_pos[None, None, :] > row_pos - window
    flat_valid = valid.reshape(-1)
    return TileGroup(
        gather_rows=gather_rows,
        kv_slots=kv_slots,
        mask=mask,
        out_rows=gather_rows.reshape(-1)[flat_valid],
        out_select=flat_valid.nonzero().squeeze(1),
    )


def _length_class(lengths: torch.Tensor, base: int) -> torch.Tensor:
    return torch.searchsorted(base ** torch.arange(32, device=lengths.device), lengths)


def plan_attention(meta: BatchMetadata, block_size: int, window: int | None = None) -> AttentionPlan:
    """Group the batch's sequences by query- and KV-length class; precompute their gathers and masks.

    window: sliding-window size (Mistral/Qwen2 semantics: position p sees p - window < k <= p); None: full.
    """
    q_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()
    live = q_lens > 0
    key = _length_class(q_lens, _Q_CLASS_BASE) * 64 + _length_class(meta.seq_lens.long(), _KV_CLASS_BASE)
    groups = [
        _tile_group(meta, (live & (key == k)).nonzero().squeeze(1), block_size, window)
        for k in torch.unique(key[live]).tolist()
    ]
    return AttentionPlan(slot_mapping=meta.slot_mapping.long(), groups=groups, num_tokens=meta.num_tokens)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's K/V [T, kv_heads, D] into the cache [2, blocks, block_size, kv_heads, D]. A one-part
    cache [1, ...] holds keys that are also the values (MLA's latent): only k is written."""
    parts, _, _, kv_heads, head_dim = kv_cache.shape
    kv_cache[0].view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    if parts == 2:
        kv_cache[1].view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def _gather_heads(cache: torch.Tensor, g: TileGroup) -> torch.Tensor:
    """One cache half [blocks, block_size, KV, D] read at the group's KV slots as [S, KV, M, D].

    Gathering head-major rows directly (row = slot * KV + head) gives the layout the matmuls need in
    one copy; gathering slots and then permuting heads forward would copy the whole KV twice.
    """
    kv_heads, head_dim = cache.shape[-2:]
    s, m = g.kv_slots.shape
    if g.head_rows is None:
        heads = torch.arange(kv_heads, device=g.kv_slots.device)
        g.head_rows = (g.kv_slots[:, None, :] * kv_heads + heads[None, :, None]).reshape(-1)
    return torch.index_select(cache.reshape(-1, head_dim), 0, g.head_rows).view(s, kv_heads, m, head_dim)


def _attend_group(
    q: torch.Tensor, kv_cache: torch.Tensor, g: TileGroup, scale: float, softcap: float | None = None
) -> torch.Tensor:
    """Masked softmax(QK^T)V for one tile group; returns [S*Q, heads, head_dim] tile rows."""
    kv_heads, head_dim = kv_cache.shape[-2:]
    s, qn = g.gather_rows.shape
    heads = q.shape[1]
    group = heads // kv_heads
    keys = _gather_heads(kv_cache[0], g)
    values = keys if kv_cache.shape[0] == 1 else _gather_heads(kv_cache[1], g)  # one part: keys are values
    # Head h reads KV head h // group (GQA); fold the group's query heads into the row dimension.
    qt = q[g.gather_rows].view(s, qn, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    qt = qt.reshape(s, kv_heads, group * qn, head_dim)
    scores = torch.matmul(qt, keys.transpose(2, 3)) * scale  # [S, KV, G*Q, M]
    if softcap is not None:  # Gemma 2's logit soft-capping, before the mask as transformers does it
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(s, kv_heads, group, qn, -1).masked_fill(~g.mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(s, kv_heads, group * qn, -1), values)
    return out.view(s, kv_heads, group, qn, head_dim).permute(0, 3, 1, 2, 4).reshape(s * qn, heads, head_dim)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write k/v [T, kv_heads, D] into the layer's cache, then attend q [T, heads, D] -> [T, heads, D];
    softcap: scores become softcap * tanh(scores / softcap)."""
    write_kv(k, v, kv_cache, plan.slot_mapping)
    out = q.new_zeros(q.shape)
    for group in plan.groups:
        rows = _attend_group(q, kv_cache, group, scale, softcap)
        out[group.out_rows] = rows[group.out_select]
    return out
