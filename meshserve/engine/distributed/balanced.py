"""Balanced expert-parallel dispatch: each token-expert pair's replica chosen from the step's counts.

The even rule (expert_map.py) sends pair i of rank r to replica (i + r) mod replicas. Under
``ep_dispatch="balanced"`` (SGLang's ``--ep-dispatch-algorithm``, DeepSeek's LPLB: the same idea)
every rank first all-gathers its per-expert pair counts [ranks, experts] of the MoE layer, then
every rank computes, from the same summed counts and with the same code, the levelling of
``placement/dispatch.balanced_shares`` (the simulator's balanced dispatch) and rounds it to
integer quotas per replica. The step's pairs of expert e are lined up rank by rank, in pair order
within a rank, and replica j serves positions [bounds[e, j - 1], bounds[e, j]). So every rank
knows where its own pairs go without more messages, and a pair's output is the same whichever
replica computes it (same weights, same row-wise kernels): tokens stay exact.

The quotas are solved per MoE layer per step, so the solve must cost little next to the layer: the
native operator (kernels/csrc/balanced_dispatch.cpp) does the levelling's arithmetic in one loop,
a few microseconds; :func:`replica_bounds_reference`, about 20 numpy calls per sweep (~0.8 ms per
layer), is its oracle and serves where the native operators are not built. Both give equal quotas.
"""

from __future__ import annotations

import numpy as np
import torch

from meshserve.kernels import native
from meshserve.placement.dispatch import balanced_shares
from meshserve.placement.plan import Placement

EP_DISPATCH = ("even", "balanced")


def replica_bounds(holds: np.ndarray, counts: np.ndarray, sweeps: int = 32) -> np.ndarray:
    """Where each replica's share of the step ends, [experts, most replicas] int64 (one MoE layer):
    :func:`replica_bounds_reference`'s quotas, from the native operator when this machine built it."""
    if not native.load():
        return replica_bounds_reference(holds, counts, sweeps)
    holds = torch.from_numpy(np.ascontiguousarray(holds, dtype=bool))
    counts = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64))
    return torch.ops.meshserve.replica_bounds(holds, counts, sweeps).numpy()


def replica_bounds_reference(holds: np.ndarray, counts: np.ndarray, sweeps: int = 32) -> np.ndarray:
    """Where each replica's share of the step ends, [experts, most replicas] int64 (one MoE layer).

    ``holds`` [experts, ranks]; ``counts`` [experts] the step's pairs per expert over all ranks.
    Column j is the cumulative quota of replicas 0..j (replica j = the j-th holder by rank), the
    levelled shares' running sum rounded: monotone, each quota within one pair of its share, the
    last column every expert's count (so columns past an expert's replicas repeat it).
    """
    counts = np.asarray(counts, dtype=np.int64)
    table = Placement(holds[None], max(int(holds.sum(axis=0).max()), 1))
    shares = balanced_shares(table, counts[None, None].astype(np.float32), sweeps)[0, 0]  # [E, most]
    ends = np.rint(np.cumsum(shares.astype(np.float64), axis=1)).astype(np.int64)
    ends = np.minimum(np.maximum.accumulate(ends, axis=1), counts[:, None])
    last = holds.sum(axis=1)[:, None] - 1  # the last replica takes the rounding's rest
    return np.where(np.arange(ends.shape[1]) >= last, counts[:, None], ends)


def balanced_picks(experts: torch.Tensor, offset: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """The replica index of each of this rank's pairs (expert ids [P], flat, in pair order).

    ``offset`` [experts]: pairs of each expert on the ranks before this one; ``bounds`` from
    :func:`replica_bounds`. A pair's position is its expert's offset plus how many of this rank's
    earlier pairs have the same expert.
    """
    order = torch.argsort(experts, stable=True)
    ranked = experts[order]
    before = torch.arange(len(experts), device=experts.device) - torch.searchsorted(ranked, ranked)
    position = torch.empty_like(experts)
    position[order] = before
    position += offset[experts]
    return (position[:, None] >= bounds[experts]).sum(dim=1)
