"""Meta-Attention as one Triton kernel over the planner's Task-Table (the GPU path, opt-in until a GPU run has
verified it: MESHSERVE_ATTENTION=triton; `attention.py` picks it).

The same inputs the native op takes (q, the paged cache, block tables, the Task-Table from
`attention_tiles.plan_tasks`), planned without KV splits (`attention.TRITON_TILES`, one thread row), so
every task is one whole tile x KV head. One program per (task, query head of the task's GQA group): it
loads the tile's query rows once, walks the task's KV range [kv_lo, kv_hi) in BLOCK_N positions, reading
K/V rows straight from the cache through the block table (no gather copy), masks by the task's kind
(none / causal / sliding window / tree bitmask) and keeps an online softmax in fp32.

Imported only on the Triton path (MESHSERVE_ATTENTION=triton); inference on the default paths never
imports it. The tests run it under `TRITON_INTERPRET=1` on CPU tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from meshserve.kernels.attention_tiles import COL, TASK_COLUMNS, MaskKind, TaskTable
from meshserve.kernels.meta_attention import write_kv

BLOCK_N = 32  # KV positions per step of a program


# Triton's interpreter (3.9) multiplies bfloat16 tl.dot operands as their uint16 bit patterns; under it the
# kernel widens them to float32 first, which is exact (bf16 x bf16 fits a float32) and sums in float32 as
# the GPU's bf16 dot does.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, WIDEN: tl.constexpr):
    if WIDEN:
        a, b = a.to(tl.float32), b.to(tl.float32)
    if IEEE:  # noqa: SIM108 (float32 inputs: no TF32 rounding, so the GPU matches the float32 reference)
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _meta_attention_kernel(
    q_ptr,
    cache_ptr,
    out_ptr,
    tables_ptr,
    tasks_ptr,
    tree_ptr,
    scale,
    q_stride_t,
    q_stride_h,
    half_stride,
    slot_stride,
    table_stride,
    num_cols,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    # Task-Table columns (attention_tiles.TASK_COLUMNS, passed by name so the order lives in one place)
    C_SEQ: tl.constexpr,
    C_Q_START: tl.constexpr,
    C_Q_ROWS: tl.constexpr,
    C_Q_POS0: tl.constexpr,
    C_KV_HEAD: tl.constexpr,
    C_KV_LO: tl.constexpr,
    C_KV_HI: tl.constexpr,
    C_MASK: tl.constexpr,
    C_WINDOW: tl.constexpr,
    C_TREE_OFF: tl.constexpr,
    C_TREE_LEN: tl.constexpr,
    C_PARTIAL: tl.constexpr,
    NONE: tl.constexpr,
    SLIDING: tl.constexpr,
    TREE: tl.constexpr,
    IEEE: tl.constexpr,
    WIDEN: tl.constexpr,
):
    task = tasks_ptr + tl.program_id(0) * num_cols
    seq = tl.load(task + C_SEQ).to(tl.int64)
    q_start = tl.load(task + C_Q_START)
    q_rows = tl.load(task + C_Q_ROWS)
    q_pos0 = tl.load(task + C_Q_POS0)
    kv_head = tl.load(task + C_KV_HEAD)
    kv_lo = tl.load(task + C_KV_LO)
    kv_hi = tl.load(task + C_KV_HI)
    kind = tl.load(task + C_MASK)
    window = tl.load(task + C_WINDOW)
    tree_off = tl.load(task + C_TREE_OFF)
    tree_len = tl.load(task + C_TREE_LEN)
    head = kv_head * GROUP + tl.program_id(1)  # GQA: query head h reads KV head h // GROUP

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < q_rows
    dim_ok = dims < HEAD_DIM
    q_offs = (q_start + rows).to(tl.int64)[:, None] * q_stride_t + head * q_stride_h + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q_pos = q_pos0 + rows  # each row's own position in its sequence
    tree_base = q_pos0 + q_rows - tree_len  # first KV position of the verify block the tree covers

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a row masked for a whole block stays 0, not NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + cols
        pos_ok = pos < kv_hi
        block = tl.load(tables_ptr + seq * table_stride + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_offs = slot[:, None] * slot_stride + kv_head * HEAD_DIM + dims[None, :]
        kv_ok = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(cache_ptr + kv_offs, mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), IEEE, WIDEN)
        see = row_ok[:, None] & (pos_ok & (pos >= kv_lo))[None, :]  # full [M, N]: the branches narrow it
        if kind != NONE:
            see = see & (pos[None, :] <= q_pos[:, None])
        if kind == SLIDING:
            see = see & (pos[None, :] > q_pos[:, None] - window)
        if kind == TREE:  # the verify block's own columns follow the draft tree, row by row
            qi = q_pos[:, None] - tree_base
            kj = pos[None, :] - tree_base
            in_tree = (qi >= 0) & (kj >= 0) & row_ok[:, None] & pos_ok[None, :]
            bit = tl.load(tree_ptr + tree_off + qi * tree_len + kj, mask=in_tree, other=1)
            see = see & (bit != 0)
        s = tl.where(see, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(cache_ptr + half_stride + kv_offs, mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, WIDEN)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot takes at least 16 in each dimension


def _constants(dtype: torch.dtype, block_size: int, head_dim: int, group: int, block_m: int) -> dict:
    return dict(
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_D=_block(head_dim),
        **{f"C_{name.upper()}": i for name, i in COL.items()},
        NONE=int(MaskKind.NONE),
        SLIDING=int(MaskKind.SLIDING),
        TREE=int(MaskKind.TREE),
        IEEE=dtype == torch.float32,
        WIDEN=_INTERPRETED and dtype != torch.float32,
    )


@dataclass
class DeviceTable:
    """A Task-Table on the kernel's device, cut into launches by row bucket; made once per forward."""

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    tree_mask: torch.Tensor
    launches: list[tuple[int, torch.Tensor]]  # (BLOCK_M, its tasks)


def prepare(table: TaskTable, device: torch.device) -> DeviceTable:
    """Copy the planner's (host) table to `device` once, in row buckets (16, 32, 64, ..: a tile's rows to the
    next power of two), so a decode's one row is padded to 16, not to the batch's longest tile."""
    if table.partial_rows:
        raise ValueError("the Triton kernel runs unsplit tasks: plan with attention.TRITON_TILES, 1 thread")
    tasks = table.tasks.cpu()
    bucket = torch.exp2(torch.log2(tasks[:, COL["q_rows"]].float()).ceil()).clamp(min=16).int()
    return DeviceTable(
        slot_mapping=table.slot_mapping.to(device),
        block_tables=table.block_tables.to(device=device, dtype=torch.int32).contiguous(),
        tree_mask=table.tree_mask.to(device),
        launches=[(m, tasks[bucket == m].to(device)) for m in torch.unique(bucket).tolist()],
    )


def run_task_table(q: torch.Tensor, kv_cache: torch.Tensor, table: DeviceTable, scale: float) -> torch.Tensor:
    """Attend q [T, heads, D] over the (already written) cache by the table's tasks -> [T, heads, D]."""
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    heads = q.shape[1]
    q, cache, tables = q.contiguous(), kv_cache.contiguous(), table.block_tables
    out = torch.zeros_like(q)
    for block_m, tasks in table.launches:  # a few buckets, never one launch per task
        _meta_attention_kernel[(len(tasks), heads // kv_heads)](
            q,
            cache,
            out,
            tables,
            tasks,
            table.tree_mask,
            scale,
            q.stride(0),
            q.stride(1),
            cache.stride(0) if cache.shape[0] == 2 else 0,  # one part: the keys are also the values (MLA)
            kv_heads * head_dim,
            tables.stride(0),
            len(TASK_COLUMNS),
            **_constants(q.dtype, block_size, head_dim, heads // kv_heads, block_m),
        )
    return out


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    table: TaskTable | DeviceTable,
    scale: float,
) -> torch.Tensor:
    """Write k/v [T, kv_heads, D] into the cache, then run the table: q [T, heads, D] -> same shape.

    The signature of `meta_attention` and `paged_attention`, so `attention.attend` can swap it in; a
    forward passes the DeviceTable it prepared once for all layers (a TaskTable is prepared here)."""
    if isinstance(table, TaskTable):
        table = prepare(table, q.device)
    write_kv(k, v, kv_cache, table.slot_mapping)
    return run_task_table(q, kv_cache, table, scale)


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_ahead(
    dtype: torch.dtype, head_dim: int, block_size: int, group: int, block_m: int = 64, capability: int = 90
) -> dict[str, object]:
    """Compile the kernel for an NVIDIA GPU of `capability` (90: H100/H200) without one (the triton wheel
    ships ptxas): catches what only the compiler sees (block shapes, types), which the interpreter does not.
    Returns the stages' code by name ("ttir", "ptx", "cubin", ..). Needs TRITON_INTERPRET unset."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointer = f"*{_TRITON_TYPES[dtype]}"
    signature = {
        "q_ptr": pointer,
        "cache_ptr": pointer,
        "out_ptr": pointer,
        "tables_ptr": "*i32",
        "tasks_ptr": "*i32",
        "tree_ptr": "*u8",
        "scale": "fp32",
    }
    signature |= {
        n: "i64"
        for n in ("q_stride_t", "q_stride_h", "half_stride", "slot_stride", "table_stride", "num_cols")
    }
    constants = _constants(dtype, block_size, head_dim, group, block_m)
    signature |= {name: "constexpr" for name in constants}
    source = ASTSource(fn=_meta_attention_kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32)).asm
