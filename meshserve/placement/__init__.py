"""Expert placement plans shared by the engine and the wafer simulator (numpy only).

A plan is a replica table ``holds[layer, expert, device]`` (:class:`Placement`). Planners see
expert loads and, where they care about distance, a device-to-device hop matrix passed in as a
plain array, so this package never imports the simulator, the engine or torch.

``make_balancer(name, config, hops, ...)`` builds one of :data:`BALANCERS`:
none (static), greedy (EPLB-style, invasive), topology (nearest free slot, invasive),
ni (NI-Balancer: threshold trigger, migration hidden in idle link time), ni-eplb (ours: NI's
trigger and migration with a movement-aware EPLB-quality planner). Given a :class:`DeviceCost`
(the experts' roofline), greedy and ni-eplb plan on predicted time instead of token counts.
"""

from __future__ import annotations

import numpy as np

from meshserve.errors import require
from meshserve.placement.cost import DeviceCost, keep_faster, layer_time
from meshserve.placement.eplb import GreedyBalancer
from meshserve.placement.ni import NIBalancer, NIEplbBalancer
from meshserve.placement.plan import (
    Migrations,
    Placement,
    migrations,
    slots_per_device,
    static_placement,
)
from meshserve.placement.policy import BalanceConfig, Balancer, NoBalancer, imbalance
from meshserve.placement.topology import TopologyBalancer

BALANCERS: dict[str, type[Balancer]] = {
    cls.name: cls for cls in (NoBalancer, GreedyBalancer, TopologyBalancer, NIBalancer, NIEplbBalancer)
}


def make_balancer(
    name: str,
    config: BalanceConfig,
    hops: np.ndarray,
    num_redundant_experts: int,
    cost: DeviceCost | None = None,
) -> Balancer:
    """The balancer called ``name`` (InputError naming ``balancer`` if unknown); see Balancer for ``cost``."""
    require(name in BALANCERS, "balancer", f"unknown {name!r}; allowed: {', '.join(BALANCERS)}")
    return BALANCERS[name](config, hops, num_redundant_experts, cost)


__all__ = [
    "BALANCERS",
    "BalanceConfig",
    "Balancer",
    "DeviceCost",
    "Migrations",
    "Placement",
    "imbalance",
    "keep_faster",
    "layer_time",
    "make_balancer",
    "migrations",
    "slots_per_device",
    "static_placement",
]
