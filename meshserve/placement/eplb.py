"""EPLB-style greedy balancer (DeepSeek EPLB's global policy), recomputed from scratch.

1. Replicate: give the redundant replicas one by one to the expert with the highest load per
   replica (load_e / replicas_e).
2. Pack: take replicas heaviest first and put each on the least-loaded device that has a free
   slot and no copy of that expert yet.

Both loops run over replicas, vectorised across layers. The new packing ignores where experts
were, so most slots change: migration is large, and it is invasive (inference waits for it).
"""

from __future__ import annotations

import numpy as np

from meshserve.placement.plan import Placement
from meshserve.placement.policy import Balancer


def replicate(load: np.ndarray, extra: int, max_replicas: int) -> np.ndarray:
    """Replica counts [layers, experts]: ``extra`` replicas added greedily to the hottest per replica."""
    layers, experts = load.shape
    reps = np.ones((layers, experts), dtype=np.int64)
    rows = np.arange(layers)
    for _ in range(extra):
        per = np.where(reps < max_replicas, load / reps, -np.inf)
        reps[rows, per.argmax(axis=1)] += 1
    return reps


def pack(load: np.ndarray, reps: np.ndarray, num_devices: int, slots: int) -> np.ndarray:
    """Balanced packing: replica table [layers, experts, devices] for replica counts ``reps``."""
    layers, experts = load.shape
    rows = np.arange(layers)
    # Every layer has the same number of replicas (sum of reps), laid out heaviest first.
    items = [np.repeat(np.arange(experts), reps[i]) for i in range(layers)]
    expert = np.stack(items)
    weight = np.take_along_axis(load / reps, expert, axis=1)
    order = np.argsort(-weight, axis=1, kind="stable")
    expert = np.take_along_axis(expert, order, axis=1)
    weight = np.take_along_axis(weight, order, axis=1)
    holds = np.zeros((layers, experts, num_devices), dtype=bool)
    used = np.zeros((layers, num_devices), dtype=np.int64)
    dev_load = np.zeros((layers, num_devices))
    for i in range(expert.shape[1]):
        e = expert[:, i]
        ok = (used < slots) & ~holds[rows, e]
        choice = np.where(ok, dev_load, np.inf).argmin(axis=1)
        placed = ok[rows, choice]  # a layer with no room left for this expert drops the replica
        r, c = rows[placed], choice[placed]
        holds[r, e[placed], c] = True
        used[r, c] += 1
        dev_load[r, c] += weight[placed, i]
    return holds


class GreedyBalancer(Balancer):
    """EPLB-style greedy: periodic, from scratch, invasive."""

    name = "greedy"
    invasive = True

    def plan(self, load: np.ndarray, current: Placement, base: Placement) -> Placement:
        devices, experts = current.num_devices, current.num_experts
        # Physical replicas as the static layout (one per device at least) plus the redundant ones.
        extra = max(experts, devices) - experts + self.num_redundant_experts
        extra = min(extra, devices * current.slots_per_device - experts)
        reps = replicate(load, extra, devices)
        # Packing heaviest first always finds a slot for an expert's first replica (total replicas
        # <= slots), so every expert keeps at least one copy.
        return Placement(pack(load, reps, devices, current.slots_per_device), current.slots_per_device)
