"""Fused causal attention in the style of Triton's tutorial 06 (FlashAttention-2 forward): dense [B, H, N, D]
tensors, no paging, no KV write; the bar `benchmarks/triton_attention.py` holds the Meta-Attention kernel to.

A program owns BLOCK_M query rows of one head: blocks left of the diagonal run unmasked, the diagonal
blocks masked (the tutorial's two stages), online softmax in base 2. GQA: head h reads KV head h // group.
Checked against SDPA under TRITON_INTERPRET=1 on CPU (float32; bfloat16 with widen=True), not yet on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _flash_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    scale_log2,
    n_ctx,
    q_sb,
    q_sh,
    kv_sb,
    kv_sh,
    seq_stride,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WIDEN: tl.constexpr,
):
    start_m = tl.program_id(0)
    batch, head = tl.program_id(1), tl.program_id(2)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    q_base = q_ptr + batch.to(tl.int64) * q_sb + head * q_sh
    kv_base = batch.to(tl.int64) * kv_sb + (head // GROUP) * kv_sh
    q = tl.load(q_base + rows[:, None] * seq_stride + dims[None, :], mask=rows[:, None] < n_ctx, other=0.0)
    if WIDEN:  # the interpreter multiplies bf16 as uint16 bits (see meshserve/kernels/triton_attention.py)
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    diagonal = start_m * BLOCK_M
    for stage in tl.static_range(2):  # 0: blocks left of the diagonal, unmasked; 1: the diagonal, masked
        lo = 0 if stage == 0 else diagonal
        hi = diagonal if stage == 0 else tl.minimum(diagonal + BLOCK_M, n_ctx)
        for start_n in range(lo, hi, BLOCK_N):
            pos = start_n + cols
            offs = kv_base + pos[:, None] * seq_stride + dims[None, :]
            k = tl.load(k_ptr + offs, mask=pos[:, None] < n_ctx, other=0.0)
            v = tl.load(v_ptr + offs, mask=pos[:, None] < n_ctx, other=0.0)
            if WIDEN:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            if stage == 1:
                s = tl.where((pos[None, :] <= rows[:, None]) & (pos[None, :] < n_ctx), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    out = acc / l_i[:, None]
    o_base = o_ptr + batch.to(tl.int64) * q_sb + head * q_sh
    tl.store(
        o_base + rows[:, None] * seq_stride + dims[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=rows[:, None] < n_ctx,
    )


def flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    block_m: int = 64,
    block_n: int = 64,
    widen: bool = False,
) -> torch.Tensor:
    """Causal attention of q [B, H, N, D] over k, v [B, KV, N, D] (D a power of two >= 16) -> [B, H, N, D].

    All four in the [B, H, N, D] layout with unit stride on D and one row stride (contiguous tensors)."""
    batch, heads, n, dim = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    grid = (triton.cdiv(n, block_m), batch, heads)
    _flash_forward_kernel[grid](
        q,
        k,
        v,
        out,
        scale * LOG2E,
        n,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        q.stride(2),
        GROUP=heads // k.shape[1],
        HEAD_DIM=dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        WIDEN=widen,
    )
    return out
