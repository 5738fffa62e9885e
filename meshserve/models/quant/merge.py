"""Joining QuantWeights the way the loader fuses layers: along N (q/k/v, gate/up) and over experts."""

from __future__ import annotations

from collections.abc import Callable

import torch

from meshserve.kernels.quant_weight import QuantWeight

Join = Callable[[list[torch.Tensor]], torch.Tensor]


def _zeros(w: QuantWeight) -> torch.Tensor:
    """w's zero points, the kernels' default (8 for 4 bits, 0 for int8) written out where w has none."""
    if w.zeros is not None:
        return w.zeros
    dtype = torch.uint8 if w.bits == 4 else torch.int8
    return torch.full(w.scales.shape, 8 if w.bits == 4 else 0, dtype=dtype)


def _join(parts: list[QuantWeight], join: Join, perm: torch.Tensor | None, what: str) -> QuantWeight:
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.in_features) != (first.bits, first.group_size, first.in_features):
            raise ValueError(f"{what}: bits, group size and in_features must agree to fuse these layers")
    zeros = None if all(p.zeros is None for p in parts) else join([_zeros(p) for p in parts])
    qweight, scales = join([p.qweight for p in parts]), join([p.scales for p in parts])
    return QuantWeight(first.bits, qweight, scales, zeros, first.group_size, perm)


def concat_rows(parts: list[QuantWeight], what: str = "weights") -> QuantWeight:
    """[N1, K] ... [Nm, K] -> [N1 + ... + Nm, K] (one GEMM for q/k/v or gate/up: one act-order for all,
    as GPTQ gives layers that read the same input)."""
    first = parts[0].perm
    for p in parts[1:]:
        if (p.perm is None) != (first is None) or (first is not None and not torch.equal(p.perm, first)):
            raise ValueError(f"{what}: act-order (g_idx) must be the same in every layer fused here")
    return parts[0] if len(parts) == 1 else _join(parts, lambda ts: torch.cat(ts, dim=-2), first, what)


def stack_experts(parts: list[QuantWeight], what: str = "experts") -> QuantWeight:
    """E weights [N, K] -> one [E, N, K]; each expert keeps its own act-order (perm [E, K])."""
    perm = None
    if any(p.perm is not None for p in parts):
        natural = torch.arange(parts[0].in_features)
        perm = torch.stack([natural if p.perm is None else p.perm.long() for p in parts])
    return _join(parts, torch.stack, perm, what)
