"""The balancer interface: when to re-plan (trigger), how to plan (planner), how migration runs.

A balancer sees the recent expert loads and the current placement. When its trigger fires it
returns a new placement; the iteration simulator turns the difference into replica copies and
either stalls inference for them (``invasive``) or streams them over idle link time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshserve.errors import integer, number
from meshserve.placement.cost import DeviceCost
from meshserve.placement.dispatch import check_rule, device_load, for_dispatch
from meshserve.placement.plan import Placement


@dataclass(frozen=True)
class BalanceConfig:
    """Balancer knobs, named as vLLM's EPLB (``--eplb-config``) where it has one.

    num_redundant_experts: extra expert replicas per layer over all devices (vLLM / SGLang name);
        None = one redundant slot per device.
    window_size: iterations of load history a plan averages (vLLM ``window_size``).
    step_interval: iterations between periodic re-plans (vLLM ``step_interval``); greedy baselines.
    imbalance_threshold: NI-Balancer fires when the imbalance (max/mean device load - 1), summed
        over the last ``window_size`` iterations above what the last plan predicted, exceeds this.
    chunk_bytes: NI-Balancer moves replicas in chunks of this size; a chunk is sent only inside a
        phase window whose idle link time fits it whole.
    plan_slack: how much less balanced than EPLB's plan (a fraction of max/mean load) ni-eplb's
        plan may be to leave replicas where they are (fewer copies, so plans land sooner).
    dispatch: how an expert's tokens are split among its replicas each iteration (dispatch.py):
        ``even`` (EPLB's and the paper's rule) or ``balanced`` (levelled on the iteration's own
        counts, after one all-gather of counts per layer; plans then get their replica groups
        joined, dispatch.join_replicas). dispatch_sweeps: the balanced split's levelling sweeps.
    dispatch_solve_us: microseconds the balanced split's solve costs per layer that has a
        replica to level, on top of the count all-gather (the published figure for the same idea:
        DeepSeek's LPLB, ~100 us per solve; docs/wafer.md, "Balanced dispatch").
    reject_slower_plans: whoever applies a plan first predicts the MoE time of the plan's own
        window with it and without it (roofline compute + all-to-all) and drops a plan that would
        not lower it: balancers plan on token counts, and a replica adds its weight reads to its
        die, which below the roofline ridge can make a balanced layer slower.
    """

    num_redundant_experts: int | None = None
    window_size: int = 10
    step_interval: int = 10
    imbalance_threshold: float = 1.0
    chunk_bytes: int = 1 << 20
    reject_slower_plans: bool = True
    plan_slack: float = 0.02
    dispatch: str = "even"
    dispatch_sweeps: int = 32
    dispatch_solve_us: float = 100.0

    def __post_init__(self) -> None:
        integer(self.window_size, "window_size", 1)
        integer(self.step_interval, "step_interval", 1)
        number(self.imbalance_threshold, "imbalance_threshold", 0)
        integer(self.chunk_bytes, "chunk_bytes", 1)
        number(self.plan_slack, "plan_slack", 0)
        check_rule(self.dispatch)
        integer(self.dispatch_sweeps, "dispatch_sweeps", 1)
        number(self.dispatch_solve_us, "dispatch_solve_us", 0)
        if self.num_redundant_experts is not None:
            integer(self.num_redundant_experts, "num_redundant_experts", 0)

    def device_load(self, placement: Placement, counts: np.ndarray) -> np.ndarray:
        """Tokens per device [..., layers, devices] of counts [..., layers, experts] under this
        config's dispatch rule (dispatch.device_load)."""
        return device_load(placement, counts, self.dispatch, self.dispatch_sweeps)

    def applied(self, plan: Placement, load: np.ndarray) -> Placement:
        """A plan as it is applied under this config's dispatch rule (dispatch.for_dispatch)."""
        return for_dispatch(plan, load, self.dispatch)


def imbalance(device_load: np.ndarray) -> np.ndarray:
    """max/mean device load - 1, averaged over layers: [..., layers, devices] -> [...]."""
    mean = device_load.mean(axis=-1)
    ratio = device_load.max(axis=-1) / np.maximum(mean, 1e-12)
    return (ratio - 1.0).mean(axis=-1)


class Balancer:
    """One balancing policy: a trigger, a planner and a migration style.

    Subclasses set ``name`` and ``invasive`` and implement :meth:`plan`; the default trigger is
    periodic every ``step_interval`` iterations once ``window_size`` iterations of history exist.
    cost: the devices' roofline; the EPLB-quality planners (greedy, ni-eplb) then plan on
    predicted time instead of token counts (the paper's planners, topology and ni, ignore it).
    """

    name = "base"
    invasive = True

    def __init__(
        self,
        config: BalanceConfig,
        hops: np.ndarray,
        num_redundant_experts: int,
        cost: DeviceCost | None = None,
    ) -> None:
        self.config = config
        self.hops = np.asarray(hops)
        self.num_redundant_experts = num_redundant_experts
        self.cost = cost  # None: plan on token counts (the engine has no roofline)

    def should_plan(self, iteration: int, history_imbalance: np.ndarray) -> bool:
        """True when a new plan is due. history_imbalance: imbalance of past iterations, oldest first."""
        window = self.config.window_size
        return iteration >= window and iteration % self.config.step_interval == 0

    def plan(self, load: np.ndarray, current: Placement, base: Placement) -> Placement:
        """A new placement for the mean expert load [layers, experts] of the history window."""
        raise NotImplementedError

    def planned(self, predicted_imbalance: float) -> None:
        """Told what imbalance the plan it just made predicts on its own window (for triggers)."""


class NoBalancer(Balancer):
    """Static placement: experts spread evenly, never moved."""

    name = "none"
    invasive = False

    def should_plan(self, iteration: int, history_imbalance: np.ndarray) -> bool:
        return False

    def plan(self, load: np.ndarray, current: Placement, base: Placement) -> Placement:
        return current
