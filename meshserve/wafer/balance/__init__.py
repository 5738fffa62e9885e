"""The simulator's side of expert balancing: migration steps and their stream through idle links.

Plans (placements, balancers, triggers) come from :mod:`meshserve.placement`, re-exported here so
simulator code has one import for both.
"""

from meshserve.placement import (
    BALANCERS,
    BalanceConfig,
    Balancer,
    Migrations,
    Placement,
    imbalance,
    make_balancer,
    migrations,
    slots_per_device,
    static_placement,
)

__all__ = [
    "BALANCERS",
    "BalanceConfig",
    "Balancer",
    "Migrations",
    "Placement",
    "imbalance",
    "make_balancer",
    "migrations",
    "slots_per_device",
    "static_placement",
]
