"""Dispatch rules: how an expert's tokens split among its replicas; joining replica groups."""

import numpy as np
import pytest
from scipy.optimize import linprog
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from meshserve.errors import InputError
from meshserve.placement import BalanceConfig, Placement, make_balancer, slots_per_device, static_placement
from meshserve.placement.dispatch import (
    balanced_load,
    balanced_shares,
    device_load,
    for_dispatch,
    join_replicas,
)
from tests.placement.test_balancers import mesh_hops, skewed_load


def random_table(rng: np.random.Generator, layers: int, experts: int, devices: int, most: int) -> Placement:
    holds = np.zeros((layers, experts, devices), dtype=bool)
    for layer in range(layers):
        for expert in range(experts):
            holds[layer, expert, rng.choice(devices, rng.integers(1, most + 1), replace=False)] = True
    return Placement(holds, experts)


def smallest_max(holds: np.ndarray, counts: np.ndarray) -> float:
    """The exact min over splits of the max device load (a linear program), one layer."""
    expert, device = np.nonzero(holds)
    k, (experts, devices) = len(expert), holds.shape
    equal = np.zeros((experts, k + 1))
    equal[expert, np.arange(k)] = 1
    below = np.zeros((devices, k + 1))
    below[device, np.arange(k)] = 1
    below[:, -1] = -1  # device load - t <= 0
    return linprog(
        np.r_[np.zeros(k), 1],
        A_ub=below,
        b_ub=np.zeros(devices),
        A_eq=equal,
        b_eq=counts,
        bounds=[(0, None)] * (k + 1),
    ).fun


def test_balanced_split_reaches_the_smallest_possible_max_and_keeps_every_token():
    rng = np.random.default_rng(0)
    for _ in range(10):
        table = random_table(rng, layers=2, experts=8, devices=6, most=3)
        counts = rng.integers(0, 50, (3, 2, 8)).astype(float)
        load = balanced_load(table, counts, sweeps=400)
        np.testing.assert_allclose(load.sum(axis=-1), counts.sum(axis=-1), rtol=1e-5)
        even = table.device_load(counts)
        assert (load.max(axis=-1) <= even.max(axis=-1) + 1e-3).all()
        for s in range(3):
            for layer in range(2):
                best = smallest_max(table.holds[layer], counts[s, layer])
                assert load[s, layer].max() == pytest.approx(best, rel=1e-4)


def test_a_few_sweeps_already_improve_on_the_even_split_and_devices_without_experts_stay_empty():
    holds = np.zeros((1, 2, 3), dtype=bool)
    holds[0, 0, [0, 1]] = True  # expert 0 on devices 0 and 1, expert 1 on device 1 only
    holds[0, 1, 1] = True
    table = Placement(holds, 2)
    counts = np.array([[[10.0, 6.0]]])
    np.testing.assert_allclose(table.device_load(counts)[0, 0], [5, 11, 0])
    np.testing.assert_allclose(device_load(table, counts, "balanced", sweeps=64)[0, 0], [8, 8, 0], atol=1e-3)


def test_without_replicas_both_rules_agree():
    table = static_placement(2, 8, 8, 1)
    counts = np.arange(32, dtype=float).reshape(2, 2, 8)
    np.testing.assert_allclose(device_load(table, counts, "balanced"), device_load(table, counts, "even"))


def test_a_table_without_replicas_has_nothing_to_join():
    table = static_placement(2, 8, 8, 2)
    assert join_replicas(table, np.ones((2, 8))) is table


def test_unknown_rule_is_refused_by_name():
    with pytest.raises(InputError, match="dispatch"):
        BalanceConfig(dispatch="random")
    with pytest.raises(InputError, match="dispatch_sweeps"):
        BalanceConfig(dispatch_sweeps=0)


def groups(table: Placement, layer: int) -> tuple[int, int]:
    """Groups of devices joined by shared replicated experts in one layer, and how many of them
    are trees (as many device-expert links as devices + experts - 1: no replica on a cycle)."""
    multi = table.holds[layer][table.replicas()[layer] > 1]  # [replicated experts, devices]
    experts, devices = multi.shape
    graph = csr_matrix(
        np.block([[np.zeros((experts, experts)), multi], [multi.T, np.zeros((devices, devices))]])
    )
    count, label = connected_components(graph, directed=False)
    nodes = np.bincount(label, minlength=count)
    links = np.bincount(label[:experts], weights=multi.sum(axis=1), minlength=count)
    return count, int(((links == nodes - 1) & (nodes > 1)).sum())


def eplb_plan(
    layers: int = 4, experts: int = 32, side: int = 4, seed: int = 0
) -> tuple[Placement, np.ndarray]:
    n = side * side
    load = skewed_load(layers, experts, seed)
    base = static_placement(layers, experts, n, slots_per_device(experts, n, n))
    return make_balancer("greedy", BalanceConfig(), mesh_hops(side, side), n).plan(load, base, base), load


def test_joining_links_every_group_of_a_layer_and_keeps_replicas_and_slots():
    plan, load = eplb_plan()
    joined = join_replicas(plan, load)
    joined.validate()
    np.testing.assert_array_equal(joined.replicas(), plan.replicas())
    np.testing.assert_array_equal(joined.used_slots(), plan.used_slots())
    for layer in range(4):
        before, trees = groups(plan, layer)
        assert before > 1 + trees  # EPLB leaves several groups with cycles (pairs of devices)
        # one group holds every device whose group had a cycle; trees and lone devices stay apart
        alone = (joined.holds[layer] & (joined.replicas()[layer] > 1)[:, None]).sum(axis=0) == 0
        assert groups(joined, layer)[0] == 1 + trees + alone.sum()
    # swapping neighbours in load order barely moves the even split's balance
    ratio = [t.device_load(load).max(axis=1) / t.device_load(load).mean(axis=1) for t in (plan, joined)]
    assert (ratio[1] <= ratio[0] * 1.1).all()


def test_joined_groups_let_a_balanced_dispatch_absorb_fresh_noise():
    plan, load = eplb_plan(seed=1)
    rng = np.random.default_rng(2)
    draws = rng.poisson(load[None], size=(20, *load.shape)).astype(float)  # iterations around the plan's load

    def spread(table: Placement, rule: str) -> float:
        loads = device_load(table, draws, rule)
        return float((loads.max(axis=-1) / loads.mean(axis=-1)).mean())

    joined = for_dispatch(plan, load, "balanced")
    assert spread(joined, "balanced") < spread(plan, "balanced") < spread(plan, "even")
    assert for_dispatch(plan, load, "even") is plan


def test_balanced_shares_are_the_split_behind_balanced_load():
    rng = np.random.default_rng(1)
    table = random_table(rng, layers=2, experts=8, devices=6, most=3)
    counts = rng.integers(0, 50, (3, 2, 8)).astype(np.float32)
    shares = balanced_shares(table, counts)  # [3, 2, 8, most]: replica j = the j-th holder by device
    np.testing.assert_allclose(shares.sum(axis=-1), counts, rtol=1e-5)
    replicas = table.replicas()
    assert (shares[..., np.arange(shares.shape[-1]) >= replicas[..., None]] == 0).all()
    load = np.zeros((3, 2, 6))
    for layer, expert in np.ndindex(2, 8):
        holders = np.flatnonzero(table.holds[layer, expert])
        load[:, layer, holders] += shares[:, layer, expert, : len(holders)]
    np.testing.assert_allclose(load, balanced_load(table, counts), rtol=1e-4, atol=1e-3)
