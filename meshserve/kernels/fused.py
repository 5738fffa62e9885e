"""Fused elementwise ops of the dense forward: RMSNorm (with the residual add), rotary on the qkv GEMM
output in place, and SiLU-mul.

Each op runs the native kernel (kernels/csrc/fused_elementwise.cpp) when this machine built it and the call
is an inference forward on CPU in float32 / bfloat16; MESHSERVE_FUSED=reference (and any other case) runs
the torch reference below, which is also the oracle the tests compare the kernels against. The kernels
read and write bfloat16 as raw bits (csrc/bf16_bits.h) so their loops vectorise (they did not before, and
lost to torch at 512 rows; docs/kernels.md has the measurements). Training always keeps the reference
(autograd).

Operands may come float32 from a bfloat16 layer's float32 GEMM (SmoothGEMM's packed_f32): every op treats
them as the reference does, rounded to the model dtype first, and `out_f32` hands the next float32 GEMM
its (model-dtype-rounded) input in float32, so neither side pays a separate conversion pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meshserve import switches
from meshserve.kernels import native


def use_fused(x: torch.Tensor) -> bool:
    """Whether the native kernels serve this tensor's op."""
    return (
        torch.is_inference_mode_enabled()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and switches.value("MESHSERVE_FUSED") == "native"
        and native.load()
    )


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x), in float32 like Hugging Face so both sides round the same way."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by cos/sin [T, head_dim] (the rotate-half convention of HF Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] = [gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_f32: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension (in float32 holding model-dtype values when out_f32 and native)."""
    if use_fused(x) and x.dim() == 2 and x.is_contiguous():
        return torch.ops.meshserve.rms_norm(x, weight, eps, out_f32)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, out_f32: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream x + delta and its RMSNorm. The native path adds into x in place (the forward
    owns its residual stream), so the sum is read once and never stored twice."""
    if use_fused(x) and x.dim() == 2 and x.is_contiguous() and delta.is_contiguous():
        return x, torch.ops.meshserve.add_rms_norm(x, delta, weight, eps, out_f32)
    x = x + delta.to(x.dtype)
    return x, rms_norm_reference(x, weight, eps)


def rotary_qkv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, heads, D], k and v [T, kv_heads, D] from the fused qkv GEMM output [T, (heads + 2 kv) D], with
    q and k rotated. The native path rotates them in place inside qkv: no split or concatenation copies."""
    t = qkv.shape[0]
    if use_fused(cos) and qkv.dim() == 2 and qkv.stride(1) == 1:
        if qkv.dtype == cos.dtype:
            torch.ops.meshserve.rotary_qkv_(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
        else:  # a float32 GEMM output: rotate and round into the model dtype in one pass
            qkv = torch.ops.meshserve.rotary_qkv_cast(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
        q, k, v = qkv.split((num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim), dim=-1)
        return (
            q.view(t, num_heads, head_dim),
            k.view(t, num_kv_heads, head_dim),
            v.view(t, num_kv_heads, head_dim),
        )
    qkv = qkv.to(cos.dtype)
    q, k, v = qkv.split((num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim), dim=-1)
    q, k = q.view(t, num_heads, head_dim), k.view(t, num_kv_heads, head_dim)
    return rotary_reference(q, cos, sin), rotary_reference(k, cos, sin), v.view(t, num_kv_heads, head_dim)


def silu_mul(gate_up: torch.Tensor, dtype: torch.dtype, out_f32: bool = False) -> torch.Tensor:
    """silu(gate) * up in `dtype` (the model's) for gate_up [T, 2I] = [gate | up]."""
    if (
        use_fused(gate_up)
        and dtype in (torch.float32, torch.bfloat16)
        and gate_up.dim() == 2
        and gate_up.stride(1) == 1
    ):
        return torch.ops.meshserve.silu_mul(gate_up, dtype, out_f32)
    return silu_mul_reference(gate_up.to(dtype))


def _rows_like(x: torch.Tensor, weight: torch.Tensor, eps: float, out_f32: bool = False) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.float32 if out_f32 else x.dtype)


def _add_rows_like(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, out_f32: bool = False
) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.float32 if out_f32 else x.dtype)


def _rotary_fake(qkv, cos, sin, num_heads, num_kv_heads, head_dim) -> None:
    return None


def _rotary_cast_fake(qkv, cos, sin, num_heads, num_kv_heads, head_dim) -> torch.Tensor:
    return qkv.new_empty(qkv.shape, dtype=cos.dtype)


def _silu_mul_fake(gate_up: torch.Tensor, dtype: torch.dtype, out_f32: bool = False) -> torch.Tensor:
    out_dtype = torch.float32 if out_f32 else dtype
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=out_dtype)


def register_fake() -> None:
    """Shape functions of the ops (just loaded by native.load), for torch.compile and fake tensors."""
    torch.library.register_fake("meshserve::rms_norm", _rows_like)
    torch.library.register_fake("meshserve::add_rms_norm", _add_rows_like)
    torch.library.register_fake("meshserve::rotary_qkv_", _rotary_fake)
    torch.library.register_fake("meshserve::rotary_qkv_cast", _rotary_cast_fake)
    torch.library.register_fake("meshserve::silu_mul", _silu_mul_fake)
