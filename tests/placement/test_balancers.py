"""Balancers (meshserve.placement): plans keep every expert, fit their slots, conserve tokens, balance."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.errors import InputError
from meshserve.placement import (
    BALANCERS,
    BalanceConfig,
    Placement,
    imbalance,
    make_balancer,
    migrations,
    slots_per_device,
    static_placement,
)


def mesh_hops(rows: int, cols: int) -> np.ndarray:
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.abs(r[:, None] - r[None]) + np.abs(c[:, None] - c[None])


def skewed_load(layers: int, experts: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.lognormal(0.0, 0.8, size=(layers, experts)) * 100


def plan(name, load, devices=16, redundant=16, hops=None):
    layers, experts = load.shape
    slots = slots_per_device(experts, devices, redundant)
    base = static_placement(layers, experts, devices, slots)
    hops = mesh_hops(4, devices // 4) if hops is None else hops
    balancer = make_balancer(name, BalanceConfig(num_redundant_experts=redundant), hops, redundant)
    return base, balancer.plan(load, base, base)


def test_static_placement_spreads_experts_evenly():
    p = static_placement(2, 32, 16, 3)
    assert (p.replicas() == 1).all() and (p.used_slots() == 2).all()
    small = static_placement(1, 4, 16, 2)  # fewer experts than devices: every device still works
    assert (small.used_slots() == 1).all() and (small.replicas() == 4).all()


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(sorted(BALANCERS)),
    experts=st.sampled_from([8, 16, 24, 40]),
    redundant=st.integers(0, 20),
    seed=st.integers(0, 1000),
)
def test_plans_keep_every_expert_within_slots_and_conserve_tokens(name, experts, redundant, seed):
    load = skewed_load(3, experts, seed)
    base, new = plan(name, load, redundant=redundant)
    new.validate()  # >= 1 replica per expert, <= slots per device
    assert (new.replicas() >= 1).all()
    assert new.used_slots().max() <= new.slots_per_device
    assert (new.replicas() <= 16).all()  # at most one copy per device
    assert (new.replicas().sum(axis=1) <= max(experts, 16) + redundant).all()
    np.testing.assert_allclose(new.device_load(load).sum(axis=1), load.sum(axis=1), rtol=1e-5)


@pytest.mark.parametrize("name", ["greedy", "topology", "ni"])
def test_balancers_lower_the_hottest_device(name):
    load = skewed_load(4, 16)
    base, new = plan(name, load)
    before, after = imbalance(base.device_load(load)), imbalance(new.device_load(load))
    assert after < 0.8 * before


def test_greedy_rebuilds_from_scratch_topology_moves_little_and_near():
    load = skewed_load(4, 32)
    hops = mesh_hops(4, 4)
    base, greedy = plan("greedy", load, hops=hops)
    _, topo = plan("topology", load, hops=hops)
    g, t = migrations(base, greedy, hops), migrations(base, topo, hops)
    assert len(t) < len(g)
    assert hops[t.src, t.dst].mean() < hops[g.src, g.dst].mean()
    # the topology-aware plan only adds replicas: every static copy stays where it was
    assert (topo.holds >= base.holds).all()


def test_migrations_copy_from_the_nearest_holder():
    hops = mesh_hops(1, 4)
    old = Placement(np.array([[[1, 0, 0, 1]]], dtype=bool), 2)
    new = Placement(np.array([[[1, 0, 1, 1]]], dtype=bool), 2)
    m = migrations(old, new, hops)
    assert (m.layer.tolist(), m.expert.tolist(), m.src.tolist(), m.dst.tolist()) == ([0], [0], [3], [2])


def test_ni_trigger_fires_on_accumulated_imbalance_only():
    ni = make_balancer("ni", BalanceConfig(window_size=4, imbalance_threshold=0.5), mesh_hops(2, 2), 4)
    assert not ni.should_plan(3, np.array([1.0, 1.0, 1.0]))  # window not full yet
    assert ni.should_plan(4, np.array([0.2, 0.2, 0.2, 0.2]))
    ni.planned(0.15)
    assert not ni.should_plan(4, np.array([0.2, 0.2, 0.2, 0.2]))
    # once a plan landed, a single iteration far enough above its prediction is enough
    assert ni.should_plan(9, np.array([0.7])) and not ni.should_plan(9, np.array([0.6]))


def test_unknown_balancer_and_too_few_slots_are_input_errors():
    with pytest.raises(InputError) as err:
        make_balancer("magic", BalanceConfig(), mesh_hops(2, 2), 0)
    assert err.value.field == "balancer" and "ni" in err.value.message
    with pytest.raises(InputError) as err:
        static_placement(1, 40, 16, 2)
    assert err.value.field == "num_redundant_experts"
    over = Placement(np.ones((1, 4, 2), dtype=bool), 2)  # 4 replicas per device, 2 slots
    with pytest.raises(InputError) as err:
        over.validate()
    assert err.value.field == "num_redundant_experts"
    for field, bad in (("window_size", 0), ("num_redundant_experts", -1), ("plan_slack", -0.1)):
        with pytest.raises(InputError) as err:
            BalanceConfig(**{field: bad})
        assert err.value.field == field


def test_ni_eplb_plans_as_well_as_eplb_with_fewer_shorter_copies():
    load = skewed_load(4, 64, seed=3)
    hops = mesh_hops(4, 4)
    base, greedy = plan("greedy", load, hops=hops)
    _, ni = plan("ni", load, hops=hops)
    _, ours = plan("ni-eplb", load, hops=hops)
    quality = {
        name: imbalance(p.device_load(load)) for name, p in [("greedy", greedy), ("ni", ni), ("ours", ours)]
    }
    # within plan_slack (0.02) of EPLB's balance (max/mean 1.02 here), well under the paper planner's
    assert quality["ours"] <= quality["greedy"] + 0.02 and quality["ours"] < quality["ni"] / 2
    g, o = migrations(base, greedy, hops), migrations(base, ours, hops)
    assert hops[o.src, o.dst].sum() < 0.8 * hops[g.src, g.dst].sum()  # bytes x hops of copying
    # re-planning a placement it made for the same load moves nothing
    again = make_balancer("ni-eplb", BalanceConfig(num_redundant_experts=16), hops, 16).plan(load, ours, base)
    assert len(migrations(ours, again, hops)) == 0


def window_mean_load(seed: int = 0) -> np.ndarray:
    """Mean expert load of 10 iterations of a seeded drifting trace: 4 layers, 64 experts, top-8."""
    from meshserve.wafer.synthetic import synthetic_trace

    trace = synthetic_trace(
        model="t",
        num_layers=4,
        num_experts=64,
        top_k=8,
        tokens_per_step=64 * 16,
        steps=10,
        scenario="mixed",
        seed=seed,
    )
    return trace.counts.mean(axis=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_on_a_seeded_trace_eplb_and_ni_eplb_plan_within_the_target(seed):
    load = window_mean_load(seed)
    ratio = {}
    for name in ("greedy", "ni-eplb", "ni"):
        _, placement = plan(name, load)
        device = placement.device_load(load)
        ratio[name] = float((device.max(axis=1) / device.mean(axis=1)).mean())
    assert ratio["greedy"] <= 1.05  # EPLB's plan, scored on the loads it planned on
    assert ratio["ni-eplb"] <= min(1.10, ratio["greedy"] + 0.02)  # the target, and within plan_slack
    assert ratio["ni-eplb"] < ratio["ni"]  # the paper's planner: replicas beside hot dies, primaries stay


def test_ni_eplb_slack_moves_fewer_copies_for_balance_within_the_slack():
    hops = mesh_hops(4, 4)
    base, first = plan("ni-eplb", window_mean_load(0), hops=hops)
    later = window_mean_load(1)  # the load has moved on
    copies, ratio = {}, {}
    for slack in (0.0, 0.1):
        config = BalanceConfig(num_redundant_experts=16, plan_slack=slack)
        balancer = make_balancer("ni-eplb", config, hops, 16)
        placement = balancer.plan(later, first, base)
        copies[slack] = len(migrations(first, placement, hops))
        device = placement.device_load(later)
        ratio[slack] = float((device.max(axis=1) / device.mean(axis=1)).mean())
    assert copies[0.1] < 0.8 * copies[0.0]
    assert ratio[0.1] <= 1.10 + 0.02 and ratio[0.0] <= 1.10
