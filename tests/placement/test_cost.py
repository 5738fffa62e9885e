"""Planning on roofline time: a replica costs its weight reads, and no plan raises a layer's time."""

import numpy as np
import pytest

from meshserve.placement import (
    BalanceConfig,
    DeviceCost,
    keep_faster,
    layer_time,
    make_balancer,
    slots_per_device,
    static_placement,
)
from tests.placement.test_balancers import mesh_hops, skewed_load

# one expert's weights take as long to read as this many tokens take to compute
COMPUTE_BOUND = DeviceCost(compute_s_per_token=1.0, weight_s_per_expert=1.0, io_s_per_token=0.0)


def memory_bound(ridge_tokens: float) -> DeviceCost:
    return DeviceCost(compute_s_per_token=1.0, weight_s_per_expert=ridge_tokens, io_s_per_token=0.0)


def plans(name, load, cost, devices=16, redundant=16):
    layers, experts = load.shape
    slots = slots_per_device(experts, devices, redundant)
    base = static_placement(layers, experts, devices, slots)
    config = BalanceConfig(num_redundant_experts=redundant, plan_slack=0.05)
    timed = make_balancer(name, config, mesh_hops(4, devices // 4), redundant, cost).plan(load, base, base)
    tokens = make_balancer(name, config, mesh_hops(4, devices // 4), redundant).plan(load, base, base)
    return base, timed, tokens


def test_a_device_is_as_slow_as_its_compute_or_its_weight_reads():
    cost = DeviceCost(compute_s_per_token=2.0, weight_s_per_expert=10.0, io_s_per_token=1.0)
    np.testing.assert_allclose(cost.time(np.array([2.0, 20.0]), np.array([1, 1])), [12.0, 40.0])
    np.testing.assert_allclose(cost.time(np.array([20.0]), np.array([3])), [50.0])


def test_layer_time_is_the_slowest_device_and_skips_idle_experts():
    holds = np.zeros((1, 3, 2), dtype=bool)
    holds[0, 0, 0] = holds[0, 1, 1] = holds[0, 2, 1] = True
    load = np.array([[4.0, 2.0, 0.0]])  # expert 2 gets no token, so device 1 reads one expert
    assert layer_time(holds, load, memory_bound(3.0))[0] == pytest.approx(4.0)
    holds[0, 0, 1] = True  # a replica of expert 0 on device 1: 2 + 2 tokens and two weight reads
    assert layer_time(holds, load, memory_bound(3.0))[0] == pytest.approx(6.0)


@pytest.mark.parametrize("name", ["greedy", "ni-eplb"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_bound_timed_plans_balance_as_well_as_token_plans(name, seed):
    load = skewed_load(4, 32, seed)
    base, timed, tokens = plans(name, load, COMPUTE_BOUND)
    timed.validate()
    spread = [
        (p.device_load(load).max(axis=1) / p.device_load(load).mean(axis=1)).mean()
        for p in (base, timed, tokens)
    ]
    assert spread[1] < 1.10 and spread[1] <= spread[2] * 1.05
    assert spread[1] < spread[0] * 0.75


@pytest.mark.parametrize("name", ["greedy", "ni-eplb"])
@pytest.mark.parametrize("ridge", [20.0, 80.0, 200.0, 1000.0])
def test_timed_plans_never_raise_a_layers_time_and_match_eplb_on_time(name, ridge):
    cost = memory_bound(ridge)
    for seed in range(3):
        load = skewed_load(4, 32, seed)
        base, timed, _ = plans(name, load, cost)
        _, _, eplb = plans("greedy", load, cost)  # EPLB's plan on token counts
        timed.validate()
        t_base, t_timed, t_eplb = (layer_time(p.holds, load, cost) for p in (base, timed, eplb))
        assert (t_timed <= t_base + 1e-9).all()
        # ni-eplb may trade plan_slack (5%) of time for fewer copies, as its token plan does
        assert (t_timed <= t_eplb * (1.0 if name == "greedy" else 1.05) + 1e-9).all()


def test_where_every_replica_costs_more_than_it_saves_nothing_moves():
    load = skewed_load(3, 32, 5)
    cost = memory_bound(1e6)  # weight reads dwarf any token count: two experts on a die always lose
    base, timed, tokens = plans("ni-eplb", load, cost)
    assert (timed.holds == base.holds).all()
    assert (layer_time(tokens.holds, load, cost) > layer_time(base.holds, load, cost)).any()


def test_keep_faster_takes_each_layer_from_the_faster_table():
    load = skewed_load(2, 8, 1)
    base = static_placement(2, 8, 4, 3)
    slower = base.holds.copy()
    slower[0, :, 0] = True  # layer 0: device 0 holds every expert, its weight reads dominate
    chosen = keep_faster(slower, base.holds, load, memory_bound(50.0))
    assert (chosen[0] == base.holds[0]).all() and (chosen[1] == base.holds[1]).all()
