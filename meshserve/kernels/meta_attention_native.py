"""The native Meta-Attention operator (kernels/csrc/meta_attention.cpp) as the rest of the forward sees it.

`torch.ops.meshserve.meta_attention` is a torch custom op; the fake impl below gives its output shape so
a compiled forward can treat it as opaque. Its oracle is `meta_attention.paged_attention`.
"""

from __future__ import annotations

import torch

from meshserve.kernels.attention_tiles import TaskTable
from meshserve.kernels.meta_attention import write_kv


def _meta_attention_fake(
    q, kv_cache, block_tables, tasks, thread_starts, combine, tree_mask, scale, partial_rows, softcap=0.0
):
    return torch.empty_like(q)


def register_fake() -> None:
    """Give the op (just loaded by native.load) its shape function, for torch.compile and fake tensors."""
    torch.library.register_fake("meshserve::meta_attention", _meta_attention_fake)


def meta_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    table: TaskTable,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write k/v [T, kv_heads, D] into the cache, then run the Task-Table: q [T, heads, D] -> same shape.
    softcap: scores become softcap * tanh(scores / softcap) before the mask (Gemma 2)."""
    write_kv(k, v, kv_cache, table.slot_mapping)
    return torch.ops.meshserve.meta_attention(
        q,
        kv_cache,
        table.block_tables,
        table.tasks,
        table.thread_starts,
        table.combine,
        table.tree_mask,
        scale,
        table.partial_rows,
        0.0 if softcap is None else float(softcap),
    )
