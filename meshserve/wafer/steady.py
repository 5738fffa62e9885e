"""Where a balancer's steady-state imbalance comes from: noise floor, forecast, planner, migration lag.

A plan is made from past loads and serves the iterations after it, each a fresh multinomial draw
around a drifting popularity. :func:`steady_gap` scores plans on the same second-half windows of
one trace, adding one cause at a time, each as max/mean device load per iteration (what the
simulator reports) and on the window's mean load (the load a plan serves on average):

1. ``floor``: EPLB planned on the scored window's own mean load (it knows the future); what is
   left is the iterations' sampling noise around their mean, which no plan made ahead can follow;
2. ``forecast``: EPLB planned on the ``window_size`` iterations before the window, applied at
   once (drift and noise in the estimate);
3. ``planner``: the balancer's own plan from the same history (ni-eplb's ``plan_slack`` trades
   balance for fewer copies), from the placement the previous forecast left, applied at once;
4. ``simulated``: the iteration simulation itself (plans land only when their copies have
   streamed through idle link time, and are re-planned at the trigger's cadence).

The scored window is ``step_interval`` iterations: the life of a plan in the paper's cadence.
Given the experts' roofline (``cost``), every plan is made by predicted time (EPLB by time:
eplb.timed_plan) and each step also reports ``time_over_even``: the layers' MoE compute time
over the even split's (every device the mean tokens through the fewest experts a layout allows).
"""

from __future__ import annotations

import numpy as np

from meshserve.placement import (
    BalanceConfig,
    DeviceCost,
    Placement,
    make_balancer,
    slots_per_device,
    static_placement,
)
from meshserve.wafer.balance_setup import BalanceSetup, setup_parts
from meshserve.wafer.iteration import EVEN, IterationResult


def max_over_mean(
    placement: Placement, counts: np.ndarray, config: BalanceConfig = EVEN, load: np.ndarray | None = None
) -> tuple[float, float]:
    """Max/mean device load of ``counts`` [S, L, E] (per iteration, and on their mean load) under
    the config's dispatch rule; ``load``: ``config.device_load(placement, counts)`` when known."""
    load = config.device_load(placement, counts) if load is None else load  # [S, L, N]
    per_iteration = load.max(axis=2).mean(axis=1) / load.mean(axis=2).mean(axis=1)
    mean = config.device_load(placement, counts.mean(axis=0))
    return float(per_iteration.mean()), float(mean.max(axis=1).mean() / mean.mean())


def time_over_even(
    placement: Placement,
    counts: np.ndarray,
    cost: DeviceCost,
    config: BalanceConfig = EVEN,
    load: np.ndarray | None = None,
) -> float:
    """MoE compute time of ``counts`` [S, L, E] under ``placement`` over the even split's (see module);
    ``load`` as in :func:`max_over_mean`."""
    load = config.device_load(placement, counts) if load is None else load
    busy = placement.busy_experts(counts)
    fewest = -(-placement.num_experts // placement.num_devices)
    even = cost.time(load.mean(axis=2), fewest).sum()
    return float(cost.time(load, busy).max(axis=2).sum() / even)


def steady_gap(setup: BalanceSetup, result: IterationResult | None = None, samples: int = 5) -> dict:
    """The four steps of the module docstring for ``setup`` (its trace, platform and balancer).

    result: ``run_setup(setup)`` when already run (its steady max/mean is step 4; omitted when None).
    """
    parts = setup_parts(setup)
    return gap(
        parts.trace.counts,
        setup.balancer,
        setup.config,
        parts.comm.hops,
        parts.redundant,
        result,
        samples,
        parts.planner_cost,
    )


def gap(
    counts: np.ndarray,
    balancer: str,
    config: BalanceConfig,
    hops: np.ndarray,
    num_redundant: int,
    result: IterationResult | None = None,
    samples: int = 5,
    cost: DeviceCost | None = None,
) -> dict[str, dict[str, float]]:
    """steady_gap on a trace ``counts`` [iterations, layers, experts] and a hop matrix."""
    steps, layers, experts = counts.shape
    devices = hops.shape[0]
    slots = slots_per_device(experts, devices, num_redundant)
    base = static_placement(layers, experts, devices, slots)
    eplb = make_balancer("greedy", config, hops, num_redundant, cost)
    ours = make_balancer(balancer, config, hops, num_redundant, cost)
    horizon, window = min(config.step_interval, steps), config.window_size
    first = max(steps // 2, 2 * window)
    starts = np.linspace(first, steps - horizon, samples).astype(int) if first <= steps - horizon else []
    scores: dict[str, list[tuple[float, ...]]] = {"floor": [], "forecast": [], "planner": []}

    def score(plan: Placement, scored: np.ndarray, load: np.ndarray) -> tuple[float, ...]:
        plan = config.applied(plan, load)  # as the simulator applies it
        per = config.device_load(plan, scored)  # both scores read it (a balanced split levels 32 sweeps)
        timed = () if cost is None else (time_over_even(plan, scored, cost, config, per),)
        return (*max_over_mean(plan, scored, config, per), *timed)

    for t in starts:
        scored, history = counts[t : t + horizon], counts[t - window : t].mean(axis=0)
        earlier = eplb.plan(counts[t - 2 * window : t - window].mean(axis=0), base, base)
        known = scored.mean(axis=0)
        scores["floor"].append(score(eplb.plan(known, base, base), scored, known))
        scores["forecast"].append(score(eplb.plan(history, base, base), scored, history))
        scores["planner"].append(score(ours.plan(history, earlier, base), scored, history))
    names = ("per_iteration", "on_mean_load", "time_over_even")
    out = {k: dict(zip(names, np.mean(s, axis=0).tolist(), strict=False)) for k, s in scores.items() if s}
    if result is not None:
        out["simulated"] = {"per_iteration": result.steady_max_over_mean}
        if cost is not None:
            out["simulated"]["time_over_even"] = result.summary()["compute_over_even_steady"]
    return out
