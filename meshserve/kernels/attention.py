"""Which attention a forward runs: on CPU the native Meta-Attention op when this machine built it, else the
torch reference (with a loud warning from `native.load`); on CUDA the reference too, until a GPU run has shown
the Triton kernel equal to it (README: "GPU paths"). MESHSERVE_ATTENTION=reference forces the reference,
MESHSERVE_ATTENTION=triton the Triton kernel (the CUDA opt-in; on CPU tensors only under TRITON_INTERPRET=1:
how the tests check it). Otherwise inference never imports triton. The switch is read at engine start
(meshserve/switches.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from meshserve import switches
from meshserve.kernels import native
from meshserve.kernels.attention_tiles import TaskTable, TileSizes, plan_tasks, plan_tasks_native, tile_sizes
from meshserve.kernels.meta_attention import AttentionPlan, paged_attention, plan_attention
from meshserve.kernels.meta_attention_native import meta_attention

if TYPE_CHECKING:  # kernels stay leaves: they only read the metadata's tensors
    from meshserve.kernels.batch import BatchMetadata


@dataclass
class TritonPlan:
    """A Task-Table planned for the Triton kernel: unsplit tasks (one program owns its rows). The first
    layer copies it to the device (`triton_attention.prepare`); the others reuse that copy."""

    table: TaskTable
    on_device: object | None = None  # a triton_attention.DeviceTable (that module imports triton)


StepPlan = TaskTable | AttentionPlan | TritonPlan

# The Triton kernel's tiles (kernels/triton_attention.py imports triton, so they live here): prefill chunks
# in 64-row tiles, up to 16-row blocks whole (a tl.dot takes 16 rows anyway), no KV splits.
TRITON_TILES = TileSizes(prefill_rows=64, short_rows=16, min_split_kv=2**30)


def attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The attention a forward on `device` runs: "native" (the CPU op, float32 / bfloat16) or "reference"
    (torch, and CUDA's default); MESHSERVE_ATTENTION=reference / triton forces one."""
    forced = switches.value("MESHSERVE_ATTENTION")
    if forced in ("reference", "triton"):
        return forced
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and native.load():
        return "native"
    return "reference"


def plan_step(
    meta: BatchMetadata,
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    windows: set[int | None],
    backend: str,
) -> dict[int | None, StepPlan]:
    """One plan per distinct sliding window (None: full attention), shared by all layers of the forward."""
    if backend == "reference":
        return {w: plan_attention(meta, block_size, window=w) for w in windows}
    if backend == "triton":  # one program per task: no KV splits, so one thread row; planned on the host
        host = meta.to(torch.device("cpu"))
        return {
            w: TritonPlan(plan_tasks(host, num_heads, num_kv_heads, TRITON_TILES, 1, window=w))
            for w in windows
        }
    sizes = tile_sizes(head_dim, dtype)
    threads = torch.get_num_threads()
    return {w: plan_tasks_native(meta, num_heads, num_kv_heads, sizes, threads, window=w) for w in windows}


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    plan: StepPlan,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write this step's K/V into the layer's cache and attend: q [T, heads, D] -> [T, heads, D].
    Score soft-capping (Gemma 2) runs in the torch and native paths: plan such a model with another
    backend than "triton"."""
    if softcap is not None and isinstance(plan, TritonPlan):
        raise ValueError(
            "attention soft-capping needs the reference or native plan (the Triton kernel lacks it)"
        )
    if isinstance(plan, TritonPlan):
        from meshserve.kernels.triton_attention import prepare, triton_attention  # imports triton: only here

        if plan.on_device is None:
            plan.on_device = prepare(plan.table, q.device)
        return triton_attention(q, k, v, kv_cache, plan.on_device, scale)
    if isinstance(plan, TaskTable):
        return meta_attention(q, k, v, kv_cache, plan, scale, softcap)
    return paged_attention(q, k, v, kv_cache, plan, scale, softcap)
