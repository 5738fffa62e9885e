"""Sparse MoE block: softmax router, top-k, optional renormalisation, stacked experts, optional shared expert.

Once prepared (the engine's prepare_gemms), the routed experts run as one native fused op
(kernels/fused_moe.py: rows read by index, float32 accumulation, SiLU-mul and the combine fused), routed by
one native call (gate logits, softmax, top-k, renormalisation and the per-expert counts; `route` below is its
oracle). The torch path below stays as the reference and serves what the op does not (other dtypes, unprepared
layers, and steps over a dtype's limit in kernels/profiles/moe.json; none is listed: the op's tiles run
float32 FMAs, bfloat16 weights widened in registers, and it matches or beats oneDNN's batched matmuls at 256+
tokens in both dtypes, docs/moe.md).
Torch path: experts run as two batched matmuls over all experts at once. Token-expert pairs are sorted
by expert and packed into a [experts, capacity, hidden] buffer (capacity = the busiest expert's pair
count), so every expert's rows sit contiguously and `torch.bmm` runs all experts in one call. Why this and not
the alternatives: a Python loop per expert (what transformers does) costs one small GEMM launch per
expert and layer; gathering each pair's expert weights ([pairs, 2I, H]) would copy gigabytes at
prefill sizes. Padding to the busiest expert costs at most a few idle rows with a balanced router,
and the bincount that sizes the buffer is the per-step expert load the engine records.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.kernels import native
from meshserve.kernels.fused_moe import (
    fused_max_tokens,
    fused_moe,
    fused_route,
    pack_experts,
    pack_experts_in_place,
    use_fused_moe,
)
from meshserve.kernels.smooth_gemm import PLAIN, GemmChoice, run_bmm
from meshserve.models.layers.mlp import GatedMLP


class StackedExperts(nn.Module):
    """All experts as two stacked tensors (transformers v5 layout): [E, 2I, H] ([gate; up]), [E, H, I]."""

    _by_m: tuple[list[GemmChoice], list[GemmChoice]] | None = None
    quantized = False  # QuantExperts (quant_experts.py) says True: SparseMoE then calls its `moe`
    packed: tuple[torch.Tensor, torch.Tensor] | None = None  # the fused op's weights (pack_experts)
    fused_max_tokens = 0  # steps of at most this many tokens take the fused op

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def transposed_layout(self) -> None:
        """Store each weight column-major (same shape and values) so `w.transpose(1, 2)` is contiguous.

        The forward multiplies by the transposes; CPU bmm runs ~30% faster on contiguous operands.
        """
        for p in (self.gate_up_proj, self.down_proj):
            p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)

    def plan(
        self,
        gate_up_by_m: list[GemmChoice],
        down_by_m: list[GemmChoice],
        fused: bool | None = None,
        budget: int = 0,
    ) -> tuple[int, tuple[bool, bool], int, int]:
        """What ``prepare`` keeps (the weights may be on meta): (the fused op's step limit, 0 = no op;
        whether each weight keeps a float32 copy; bytes kept beyond the loaded weights; of those, the
        bytes ``budget`` paid for). One copy unless the budget pays: the fused op's packed copy replaces
        the loaded weights and serves every step, whatever its listed limit (profiles/moe.json); a limit
        and the float32 copies of the torch path's ``packed_f32`` choices need a second copy each."""
        w, down = self.gate_up_proj, self.down_proj
        fused = use_fused_moe(w.dtype, w.shape[2]) if fused is None else fused
        loaded = (w.numel() + down.numel()) * w.dtype.itemsize
        limit, extra, used = 0, 0, 0
        if fused:
            meta = (torch.empty(p.shape, dtype=p.dtype, device="meta") for p in (w, down))
            packed = sum(p.numel() * p.element_size() for p in pack_experts(*meta))
            limit = fused_max_tokens(w.dtype)
            if limit < sys.maxsize and packed <= budget:  # both copies: the torch path serves big steps
                extra = used = packed
            else:
                limit, extra = sys.maxsize, packed - loaded
        keep_f32 = []
        for p, by_m in zip((w, down), (gate_up_by_m, down_by_m), strict=True):
            size = p.numel() * 4
            keep = (
                limit < sys.maxsize
                and p.dtype != torch.float32
                and any(c.kernel == "packed_f32" for c in by_m)
                and used + size <= budget
            )
            keep_f32.append(keep)
            extra, used = extra + size * keep, used + size * keep
        return limit, (keep_f32[0], keep_f32[1]), extra, used

    def prepare(
        self,
        gate_up_by_m: list[GemmChoice],
        down_by_m: list[GemmChoice],
        fused: bool | None = None,
        budget: int = 0,
    ) -> int:
        """SmoothGEMM choices per expert capacity M (index = M) for the torch path's two batched matmuls,
        and the weights packed for the fused op (the default wherever the native op serves this dtype),
        kept as ``plan`` says; returns the bytes of ``budget`` spent. Where the packed copy is the only
        one, the loaded weights are dropped (left on the meta device, shapes only)."""
        w = self.gate_up_proj.detach()
        if w.is_meta:  # packed earlier and dropped: the packed copy is all there is
            if fused is False or self.packed is None:
                raise RuntimeError("these experts were packed for the fused MoE op and kept only packed")
            self._by_m, self._f32 = (gate_up_by_m, down_by_m), (None, None)
            return 0
        limit, keep_f32, _, used = self.plan(gate_up_by_m, down_by_m, fused, budget)
        self.packed, self.fused_max_tokens = None, limit
        if limit:
            if not native.load():
                raise RuntimeError(f"the fused MoE op is not built: run `{native.BUILD_COMMAND}`")
            if limit == sys.maxsize:  # the packed copy will be the only one: pack over it
                self.packed = pack_experts_in_place(w, self.down_proj.detach())
                self.drop_unpacked()
            else:
                self.packed = pack_experts(w, self.down_proj.detach())
        self._by_m = (gate_up_by_m, down_by_m)
        self._f32 = tuple(
            p.detach().float() if keep else None
            for p, keep in zip((self.gate_up_proj, self.down_proj), keep_f32, strict=True)
        )
        return used

    def drop_unpacked(self) -> None:
        """Keep only the packed copy: the stacked weights become meta tensors (their shapes stay)."""
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(self, name)
            setattr(self, name, nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), False))

    def kept_bytes(self, gate_up_by_m: list[GemmChoice], down_by_m: list[GemmChoice], budget: int = 0) -> int:
        """Bytes ``prepare`` with these choices keeps beyond the loaded weights (they may be on meta)."""
        return self.plan(gate_up_by_m, down_by_m, budget=budget)[2]

    def matmul(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """x [E, M, K] times expert weights ``which`` (0: gate_up, 1: down), transposed: [E, M, N]."""
        weight = self.gate_up_proj if which == 0 else self.down_proj
        by_m = self._by_m[which] if self._by_m is not None else [PLAIN]
        choice = by_m[min(x.shape[1], len(by_m) - 1)]
        return run_bmm(choice, x, weight, self._f32[which] if self._by_m is not None else None)


class SparseMoE(nn.Module):
    """Routed experts (+ a sigmoid-gated shared expert when `shared_intermediate_size` > 0).

    renormalize: divide the top-k probabilities by their sum (Mixtral always, Qwen when norm_topk_prob).
    weights_in_model_dtype: Qwen casts routing weights to the model dtype before mixing; Mixtral keeps
    them in float32. Matching this keeps bfloat16 results close to transformers'.
    """

    native_router = True  # the native op routes (softmax top-k); a subclass with another router says False

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        weights_in_model_dtype: bool,
        shared_intermediate_size: int = 0,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.weights_in_model_dtype = renormalize, weights_in_model_dtype
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = StackedExperts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = (
            GatedMLP(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        )
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_intermediate_size else None
        self.register_buffer("last_counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k routing weights [T, k] and expert ids [T, k] for tokens x [T, H]."""
        logits = self.gate(x)
        weights, experts = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_in_model_dtype:
            weights = weights.to(x.dtype)
        return weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.experts.packed
        fused = (
            packed is not None and packed[0].dtype == x.dtype and x.shape[0] <= self.experts.fused_max_tokens
        )
        if fused and self.native_router:
            # Native router: one call (the torch route is six small ops per layer).
            weights, experts, self.last_counts = fused_route(
                x, self.gate.weight.detach(), self.top_k, self.renormalize
            )
            if self.weights_in_model_dtype:
                weights = weights.to(x.dtype)
        else:
            weights, experts = self.route(x)
            self.last_counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts)
        if fused:
            out = fused_moe(x, experts, weights, packed)
        elif self.experts.quantized:
            out = self.experts.moe(x, experts, weights)
        else:
            out = self._experts_torch(x, weights, experts, self.last_counts)
        shared = self.shared_output(x)
        return out if shared is None else out + shared

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert's term (Qwen gates it by a sigmoid); None without one."""
        if self.shared_expert is None:
            return None
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def _experts_torch(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """The routed experts' weighted sum through two batched matmuls over a packed [E, capacity, H]."""
        t, hidden = x.shape
        pair_expert = experts.reshape(-1)

        order = torch.argsort(pair_expert, stable=True)
        sorted_expert = pair_expert[order]
        rank = (
            torch.arange(order.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[sorted_expert]
        )
        packed = x.new_zeros(self.num_experts, int(counts.max()), hidden)
        packed[sorted_expert, rank] = x[order // self.top_k]

        gate, up = self.experts.matmul(packed, 0).chunk(2, dim=-1)
        expert_out = self.experts.matmul(F.silu(gate) * up, 1)
        pair_out = x.new_empty(order.numel(), hidden)
        pair_out[order] = expert_out[sorted_expert, rank]
        return (pair_out.view(t, self.top_k, hidden) * weights[..., None]).sum(dim=1).to(x.dtype)
