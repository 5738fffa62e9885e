"""NI-Balancer (MoEntwine): threshold-triggered, topology-aware planning for non-invasive migration.

Trigger: each iteration's imbalance (max/mean device load - 1) above what the last plan
predicted is summed over the iterations since that plan landed (at most the last
``window_size``); a plan fires when that sum passes ``imbalance_threshold`` and a full window of
load history exists (threshold 0: as soon as the last plan landed).
The copies it asks for are streamed through idle link time by whoever applies the plan (the
simulator costs them in meshserve.wafer.balance), so inference never waits.
"""

from __future__ import annotations

import numpy as np

from meshserve.placement.cost import DeviceCost, keep_faster, layer_time
from meshserve.placement.eplb import pack, relabel, replica_counts, timed_plan
from meshserve.placement.plan import Placement
from meshserve.placement.policy import BalanceConfig, Balancer
from meshserve.placement.topology import topology_plan


class NIBalancer(Balancer):
    """Non-invasive balancer: imbalance-triggered topology-aware plans, migrated in hidden steps."""

    name = "ni"
    invasive = False

    def __init__(
        self,
        config: BalanceConfig,
        hops: np.ndarray,
        num_redundant_experts: int,
        cost: DeviceCost | None = None,
    ) -> None:
        super().__init__(config, hops, num_redundant_experts, cost)
        self.reference = 0.0

    def should_plan(self, iteration: int, history_imbalance: np.ndarray) -> bool:
        # a plan needs a full window of load; the excess counts only iterations since the last
        # plan landed (history_imbalance), however few: expert loads do not depend on the placement
        window = self.config.window_size
        if iteration < window:
            return False
        excess = np.maximum(history_imbalance[-window:] - self.reference, 0.0).sum()
        return bool(excess > self.config.imbalance_threshold)

    def plan(self, load: np.ndarray, current: Placement, base: Placement) -> Placement:
        holds = topology_plan(load, base, self.hops, self.num_redundant_experts)
        return Placement(holds, current.slots_per_device)

    def planned(self, predicted_imbalance: float) -> None:
        self.reference = predicted_imbalance


class NIEplbBalancer(NIBalancer):
    """NI-Balancer's trigger and non-invasive migration with an EPLB-quality planner (ours).

    The paper's planner only adds replicas next to hot dies and never moves a primary, which caps
    how well it can balance. This one takes EPLB's replica counts and makes two packings: a
    movement-aware one (eplb.pack with the current table and hops: a replica stays where a copy
    already is while its device stays within ``plan_slack`` of an even share, else goes to the
    device nearest a current holder) and EPLB's own, its bins relabelled onto the devices that
    already hold most of their experts (eplb.relabel). Each layer keeps the movement-aware one
    unless EPLB's balances better by more than ``plan_slack``. Primaries move too; the copies
    stream through idle link time as NI's, so there is no stall. Given the roofline (``cost``),
    EPLB's packing is eplb.timed_plan's, the two are compared on predicted layer time, and a
    layer the plan would not speed up keeps its table.
    """

    name = "ni-eplb"

    def plan(self, load: np.ndarray, current: Placement, base: Placement) -> Placement:
        reps = replica_counts(load, current, self.num_redundant_experts)
        devices, slots, slack = current.num_devices, current.slots_per_device, self.config.plan_slack
        near = pack(load, reps, devices, slots, current.holds, self.hops, slack)
        if self.cost is None:
            fastest = pack(load, reps, devices, slots)
        else:  # EPLB by roofline time: as many replicas as pay for their weight reads
            fastest, _, _ = timed_plan(load, current, self.num_redundant_experts, self.cost)
        eplb = relabel(fastest, current.holds, self.hops)
        if self.cost is None:
            spread = [max_over_mean(Placement(h, slots).device_load(load)) for h in (near, eplb)]
        else:
            spread = [layer_time(h, load, self.cost) for h in (near, eplb)]
        keep = spread[0] <= spread[1] * (1.0 + slack) + 1e-9
        holds = np.where(keep[:, None, None], near, eplb)
        if self.cost is not None:  # a layer the plan would not speed up keeps its table
            holds = keep_faster(holds, current.holds, load, self.cost)
        return Placement(holds, slots)


def max_over_mean(device_load: np.ndarray) -> np.ndarray:
    """Hottest device over the mean, per layer: [..., devices] -> [...]."""
    return device_load.max(axis=-1) / np.maximum(device_load.mean(axis=-1), 1e-12)
