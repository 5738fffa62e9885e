"""Which attention a forward runs: the native Meta-Attention op when this machine built it, else the torch
reference (with a loud warning from `native.load`). MESHSERVE_ATTENTION=reference forces the reference.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from meshserve.kernels import native
from meshserve.kernels.attention_tiles import TaskTable, plan_tasks_native, tile_sizes
from meshserve.kernels.meta_attention import AttentionPlan, paged_attention, plan_attention
from meshserve.kernels.meta_attention_native import meta_attention

if TYPE_CHECKING:  # kernels stay leaves: they only read the metadata's tensors
    from meshserve.models.batch import BatchMetadata

StepPlan = TaskTable | AttentionPlan


def use_native(device: torch.device, dtype: torch.dtype) -> bool:
    """The native op serves float32 / bfloat16 on CPU unless the reference is forced."""
    if os.environ.get("MESHSERVE_ATTENTION", "native") == "reference":
        return False
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and native.load()


def plan_step(
    meta: BatchMetadata,
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    windows: set[int | None],
    native_op: bool,
) -> dict[int | None, StepPlan]:
    """One plan per distinct sliding window (None: full attention), shared by all layers of the forward."""
    if not native_op:
        return {w: plan_attention(meta, block_size, window=w) for w in windows}
    sizes = tile_sizes(head_dim, dtype)
    threads = torch.get_num_threads()
    return {w: plan_tasks_native(meta, num_heads, num_kv_heads, sizes, threads, window=w) for w in windows}


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, plan: StepPlan, scale: float
) -> torch.Tensor:
    """Write this step's K/V into the layer's cache and attend: q [T, heads, D] -> [T, heads, D]."""
    if isinstance(plan, TaskTable):
        return meta_attention(q, k, v, kv_cache, plan, scale)
    return paged_attention(q, k, v, kv_cache, plan, scale)
