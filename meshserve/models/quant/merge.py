"""Joining QuantWeights the way the loader fuses layers: along N (q/k/v, gate/up) and over experts."""

from __future__ import annotations

from collections.abc import Callable

import torch

from meshserve.kernels.quant_weight import QuantWeight


def _zeros(w: QuantWeight) -> torch.Tensor:
    """w's zero points, the kernels' default (8 for 4 bits, 0 for int8) written out where w has none."""
    if w.zeros is not None:
        return w.zeros
    dtype = torch.uint8 if w.bits == 4 else torch.int8
    return torch.full(w.scales.shape, 8 if w.bits == 4 else 0, dtype=dtype)


def _join(
    parts: list[QuantWeight], join: Callable[[list[torch.Tensor]], torch.Tensor], what: str
) -> QuantWeight:
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.in_features) != (first.bits, first.group_size, first.in_features):
            raise ValueError(f"{what}: bits, group size and in_features must agree to fuse these layers")
        if (p.perm is None) != (first.perm is None) or (
            p.perm is not None and not torch.equal(p.perm, first.perm)
        ):
            raise ValueError(f"{what}: act-order (g_idx) must be the same in every layer fused here")
    zeros = None if all(p.zeros is None for p in parts) else join([_zeros(p) for p in parts])
    return QuantWeight(
        first.bits,
        join([p.qweight for p in parts]),
        join([p.scales for p in parts]),
        zeros,
        first.group_size,
        first.perm,
    )


def concat_rows(parts: list[QuantWeight], what: str = "weights") -> QuantWeight:
    """[N1, K] ... [Nm, K] -> [N1 + ... + Nm, K] (one GEMM for q/k/v or gate/up)."""
    return parts[0] if len(parts) == 1 else _join(parts, lambda ts: torch.cat(ts, dim=-2), what)


def stack_experts(parts: list[QuantWeight], what: str = "experts") -> QuantWeight:
    """E weights [N, K] -> one [E, N, K]."""
    return _join(parts, lambda ts: torch.stack(ts), what)
