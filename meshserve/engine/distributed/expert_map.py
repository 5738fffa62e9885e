"""Where expert replicas live on the ranks, as the lookup tables expert-parallel dispatch needs.

``holds[moe_layer, expert, rank]`` (bool) is the placement. A rank keeps the experts it holds as
consecutive slots in expert order. Each token-expert pair goes to one replica of its expert, chosen
without communication: pair i of rank r takes replica (i + r) mod replicas, so replicas share an
expert's tokens evenly (the rule the balancers plan with) and every rank computes the same answer.
``balanced_destinations`` is the balanced rule instead (balanced.py): picks from the step's counts.
"""

from __future__ import annotations

import numpy as np
import torch

from meshserve.engine.distributed.balanced import balanced_picks, replica_bounds
from meshserve.errors import InputError, require


def validate_placement(holds: np.ndarray, num_layers: int, num_experts: int, num_ranks: int) -> np.ndarray:
    """``holds`` as a bool array, or InputError naming ``expert_placement`` and what is wrong."""
    holds = np.asarray(holds, dtype=bool)
    want = (num_layers, num_experts, num_ranks)
    require(
        holds.shape == want,
        "expert_placement",
        f"must have shape [moe_layers, experts, ranks] = {list(want)}, got {list(holds.shape)}",
    )
    missing = np.argwhere(~holds.any(axis=2))
    if len(missing):
        layer, expert = missing[0]
        raise InputError(
            "expert_placement",
            f"expert {expert} of MoE layer {layer} is on no rank ({len(missing)} experts without a replica)",
        )
    return holds


def spread_placement(num_layers: int, num_experts: int, num_ranks: int, num_redundant: int) -> np.ndarray:
    """Expert e on rank e mod ranks, then each redundant replica (of experts 0, 1, ... in turn) on the
    least-filled rank that lacks that expert. Same table for every layer."""
    require(
        num_ranks <= num_experts,
        "data_parallel_size",
        f"expert parallelism needs at least one expert per rank: {num_ranks} ranks > {num_experts} experts",
    )
    require(
        num_redundant <= num_experts * (num_ranks - 1),
        "num_redundant_experts",
        f"at most experts x (ranks - 1) = {num_experts * (num_ranks - 1)} replicas fit without two "
        f"copies of an expert on one rank, got {num_redundant}",
    )
    holds = np.zeros((num_experts, num_ranks), dtype=bool)
    holds[np.arange(num_experts), np.arange(num_experts) % num_ranks] = True
    for j in range(num_redundant):  # init time only, a few dozen replicas
        e = j % num_experts
        used = np.where(holds[e], np.iinfo(np.int64).max, holds.sum(axis=0))
        holds[e, int(used.argmin())] = True
    return np.broadcast_to(holds, (num_layers, num_experts, num_ranks)).copy()


class ExpertMap:
    """Lookup tensors for one placement: replica ranks per expert and each rank's local slots."""

    def __init__(self, holds: np.ndarray, device: torch.device | str = "cpu") -> None:
        self.holds = np.asarray(holds, dtype=bool)
        replicas = self.holds.sum(axis=2)
        # Ranks holding each expert first (ascending), then padding.
        ranks_first = np.argsort(~self.holds, axis=2, kind="stable")[:, :, : int(replicas.max())]
        self.replica_rank = torch.from_numpy(np.ascontiguousarray(ranks_first)).to(device)
        self.num_replicas = torch.from_numpy(replicas).to(device)
        self.replicated = replicas.max(axis=1) > 1  # [layer]: a layer of single copies has nothing to level
        slot = np.cumsum(self.holds, axis=1) - 1
        self.slot_of = torch.from_numpy(np.where(self.holds, slot, -1)).to(device)  # [layer, expert, rank]

    @property
    def num_ranks(self) -> int:
        return int(self.holds.shape[2])

    def local_experts(self, layer: int, rank: int) -> np.ndarray:
        """Expert ids rank holds in a MoE layer, in slot order."""
        return np.flatnonzero(self.holds[layer, :, rank])

    def destinations(self, layer: int, experts: torch.Tensor, rank: int) -> torch.Tensor:
        """The rank each pair (expert ids, flat) of ``rank`` is sent to."""
        pair = torch.arange(experts.numel(), device=experts.device)
        pick = (pair + rank) % self.num_replicas[layer, experts]
        return self.replica_rank[layer, experts, pick]

    def balanced_destinations(
        self, layer: int, experts: torch.Tensor, rank: int, counts: torch.Tensor
    ) -> torch.Tensor:
        """The rank each pair of ``rank`` is sent to under the balanced rule; ``counts`` [ranks, experts] are
        the step's pair counts of every rank (the same on every rank, so every rank gets the same quotas)."""
        bounds = replica_bounds(self.holds[layer], counts.sum(dim=0).cpu().numpy())
        offset = counts[:rank].sum(dim=0).to(experts.device)
        pick = balanced_picks(experts, offset, torch.from_numpy(bounds).to(experts.device))
        return self.replica_rank[layer, experts, pick]
