"""Topology-aware greedy balancer (MoEntwine): replicas go to the nearest cold die with a free slot.

Starting from the static layout (primary copies never move), repeat: take the hottest device
(load H_d = sum over its experts of load_e / replicas_e), its expert with the most load per
replica, and copy that expert to the nearest device (mesh hops from the hot one) that has a free
slot, no copy yet, and would stay below the hottest device's load after taking its share. A
layer stops when no such device exists or its redundant replicas are used up. Copies come from a
neighbour of the hot die, so migration is short; it is still invasive in this class.
"""

from __future__ import annotations

import numpy as np

from meshserve.placement.plan import Placement, count_true
from meshserve.placement.policy import Balancer


def topology_plan(load: np.ndarray, base: Placement, hops: np.ndarray, extra: int) -> np.ndarray:
    """Replica table [layers, experts, devices]: ``base`` plus up to ``extra`` nearby replicas per layer."""
    holds = base.holds.copy()
    layers = holds.shape[0]
    rows = np.arange(layers)
    reps = count_true(holds, 2).astype(np.float64)
    used = count_true(holds, 1)
    dev_load = np.einsum("le,led->ld", load / reps, holds)
    hops = np.asarray(hops, dtype=np.float64)
    active = np.ones(layers, dtype=bool)
    for _ in range(extra):
        if not active.any():
            break
        hot = dev_load.argmax(axis=1)
        hot_load = dev_load[rows, hot]
        per = load / reps
        expert = np.where(holds[rows, :, hot], per, -np.inf).argmax(axis=1)
        l_e, r_e = load[rows, expert], reps[rows, expert]
        new_share = l_e / (r_e + 1)
        ok = (used < base.slots_per_device) & ~holds[rows, expert]
        ok &= dev_load + new_share[:, None] < hot_load[:, None]
        ok &= active[:, None]
        # Nearest first; among equally near devices, the coldest.
        score = hops[hot] + dev_load / (2 * np.maximum(hot_load[:, None], 1e-12))
        target = np.where(ok, score, np.inf).argmin(axis=1)
        moved = ok[rows, target]
        active &= moved
        r, e, c = rows[moved], expert[moved], target[moved]
        dev_load[r] -= holds[r, e] * (l_e[moved] / r_e[moved] - new_share[moved])[:, None]
        holds[r, e, c] = True
        dev_load[r, c] += new_share[moved]
        reps[r, e] += 1
        used[r, c] += 1
    return holds


class TopologyBalancer(Balancer):
    """Topology-aware greedy: periodic like EPLB, but incremental and nearest-slot; invasive."""

    name = "topology"
    invasive = True

    def plan(self, load: np.ndarray, current: Placement, base: Placement) -> Placement:
        holds = topology_plan(load, base, self.hops, self.num_redundant_experts)
        return Placement(holds, current.slots_per_device)
