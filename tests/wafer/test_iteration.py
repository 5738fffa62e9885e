"""Iteration-level simulation: stalls, hidden migration, conservation, determinism, bad input."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.errors import InputError
from meshserve.placement import layer_time
from meshserve.wafer.balance import (
    BalanceConfig,
    Balancer,
    Placement,
    make_balancer,
    migrations,
    slots_per_device,
    static_placement,
)
from meshserve.wafer.balance.steps import split_steps
from meshserve.wafer.balance.stream import Flight, window_bytes
from meshserve.wafer.balance_setup import BalanceSetup, comm_model, expert_cost, run_setup, setup_parts
from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.iteration import evaluate, faster_layers, simulate_iterations
from meshserve.wafer.models import load_model
from meshserve.wafer.synthetic import synthetic_trace

MODEL = dataclasses.replace(
    load_model("deepseek-v3"), name="tiny", num_layers=3, first_dense_layers=0, routed_experts=16, top_k=2
)


def platform(rows: int, cols: int, tp: int, mapping: str, tokens: int = 64):
    hw = load_hardware("wsc-8x8").with_mesh(rows, cols)
    return hw, comm_model(hw, tp, mapping, MODEL, tokens)


def tiny_trace(devices: int, steps: int = 60, scenario: str = "fixed", seed: int = 0):
    return synthetic_trace(
        model="tiny",
        num_layers=3,
        num_experts=16,
        top_k=2,
        tokens_per_step=64 * devices,
        steps=steps,
        scenario=scenario,
        zipf_exponent=0.6,
        seed=seed,
    )


def run(name: str, rows=4, cols=4, tp=4, mapping="er", steps=60, seed=0, **config):
    hw, comm = platform(rows, cols, tp, mapping)
    n = hw.num_devices
    redundant = config.pop("num_redundant_experts", n)
    cfg = BalanceConfig(num_redundant_experts=redundant, **config)
    base = static_placement(3, 16, n, slots_per_device(16, n, redundant))
    trace = tiny_trace(n, steps, seed=seed)
    balancer = make_balancer(name, cfg, comm.hops, redundant)
    result = simulate_iterations(
        trace.counts, trace.tokens_per_step(), balancer, base, comm, expert_cost(MODEL, hw)
    )
    return result, trace


def test_static_run_conserves_tokens_and_never_migrates():
    result, trace = run("none")
    routed = trace.counts.sum(axis=2).mean(axis=1)  # token slots per layer
    np.testing.assert_allclose(result.mean_load * 16, routed, rtol=1e-5)
    assert result.stall_s.sum() == 0 and result.migrated_bytes.sum() == 0 and result.plans == []
    assert (result.max_load >= result.mean_load).all()
    s = result.summary()  # the attention reduction adds its time to every layer when counted
    moe = result.moe_time_s.sum()
    assert s["moe_and_reduction_tokens_per_s_per_device"] == pytest.approx(
        s["moe_tokens_per_s_per_device"] * moe / (moe + result.allreduce_s.sum())
    )


class MoveOnce(Balancer):
    """Test balancer: at iteration 2 add the given (expert, device) replicas to layer 0."""

    name = "move-once"
    invasive = True

    def __init__(self, adds, reject_slower_plans=False):
        config = BalanceConfig(window_size=1, step_interval=1, reject_slower_plans=reject_slower_plans)
        super().__init__(config, np.zeros((1, 1)), 0)
        self.adds = adds

    def should_plan(self, iteration, history_imbalance):
        return iteration == 2

    def plan(self, load, current, base):
        holds = current.holds.copy()
        for expert, device in self.adds:
            holds[0, expert, device] = True
        return Placement(holds, current.slots_per_device)


@pytest.mark.parametrize(
    ("adds", "bytes_on_hottest_link", "route"),
    [([(0, 3)], 1, (0, 3)), ([(0, 2), (1, 3)], 2, (0, 2))],  # the second pair shares link 1->2
)
def test_invasive_stall_is_bytes_over_bandwidth(adds, bytes_on_hottest_link, route):
    hw, comm = platform(1, 4, 1, "baseline")
    base = static_placement(3, 16, 4, 5)  # expert e starts on device e % 4
    trace = tiny_trace(4, steps=5)
    result = simulate_iterations(
        trace.counts, trace.tokens_per_step(), MoveOnce(adds), base, comm, expert_cost(MODEL, hw)
    )
    weight = MODEL.expert_params * MODEL.bytes_per_element
    expected = bytes_on_hottest_link * weight / hw.link_bandwidth + comm.path_latency[route]
    assert result.plans == [2]
    assert result.stall_s[2] == pytest.approx(expected, rel=1e-9)
    assert result.stall_s.sum() == result.stall_s[2]
    assert result.migrated_bytes.sum() == len(adds) * weight


def test_ni_balancer_never_stalls_and_stays_inside_idle_link_time():
    # the tiny model is memory-bound, where replicas only add weight reads: force the plans through
    ni, _ = run("ni", steps=80, imbalance_threshold=0.2, reject_slower_plans=False)
    none, _ = run("none", steps=80)
    assert ni.plans and ni.migrated_bytes.sum() > 0
    assert ni.stall_s.sum() == 0.0
    assert 0 < ni.max_link_utilization <= 1.0 + 1e-9  # no phase ran longer because of migration
    assert ni.max_load[-20:].mean() < none.max_load[-20:].mean()


def test_a_layer_switches_as_soon_as_its_own_copies_landed():
    hw, comm = platform(4, 4, 4, "er")  # FTDs are the 2x2 blocks: devices 0, 1, 4, 5 share one
    cost = expert_cost(MODEL, hw)
    origin = static_placement(3, 16, 16, 2)  # expert e on device e
    holds = origin.holds.copy()
    holds[0, 4, 5] = True  # layer 0: one copy over link 4 -> 5
    holds[2, 0, [1, 5]] = True  # layer 2: two copies that share link 0 -> 1 (XY: 0 -> 1 -> 5)
    target = Placement(holds, 2)
    moves = migrations(origin, target, comm.hops)
    steps = split_steps(moves, comm.ftd, comm.hops)
    flight = Flight.begin(origin, target, steps, moves.layer, cost.weight_bytes)
    assert flight.landed_layers().tolist() == [False, True, False]  # layer 1 needs no copy
    block = evaluate(tiny_trace(16, steps=1).counts, origin, comm, cost)
    a2a = [
        (block.dispatch_bytes[0], block.dispatch_s[0], comm.dispatch.links),
        (block.combine_bytes[0], block.combine_s[0], comm.combine.links),
    ]
    landed_at = {}
    for iteration in range(100):
        done, _, _ = flight.advance(comm, a2a, 1 << 16)
        for layer in np.flatnonzero(flight.landed_layers()):
            landed_at.setdefault(int(layer), iteration)
        if landed_at.get(0) == iteration and not done:  # layer 0 in use, layer 2 still on its old table
            now = flight.placement().holds
            np.testing.assert_array_equal(now[:2], target.holds[:2])
            np.testing.assert_array_equal(now[2], origin.holds[2])
        if done:
            break
    # the shared link halves layer 2's rate: it lands last, layer 0 long before it
    assert done and landed_at[1] == 0 < landed_at[0] < landed_at[2] == iteration


def test_greedy_stalls_for_its_migration_and_balances_best():
    greedy, _ = run("greedy", steps=40, reject_slower_plans=False)
    topo, _ = run("topology", steps=40, reject_slower_plans=False)
    assert greedy.stall_s.sum() > topo.stall_s.sum() > 0
    assert greedy.migrated_bytes.sum() > topo.migrated_bytes.sum()
    assert greedy.plans == topo.plans == [10, 20, 30]


def test_window_bytes_deals_whole_chunks_and_never_overfills_a_link():
    hw, comm = platform(1, 4, 1, "baseline")
    n = 4
    rows = np.array([0 * n + 3, 1 * n + 2, 2 * n + 3])  # 0->3 and 1->2 share link 1->2; 2->3 too
    slack = np.full(comm.bandwidth.shape, 10.0)
    per = window_bytes(comm.routes, rows, slack, chunk_bytes=4)
    link_bytes = comm.routes[rows].T @ per
    assert (link_bytes <= slack).all()
    assert per.tolist() == [4.0, 4.0, 4.0]  # 2 chunks per link, shared by two steps each
    slack[:] = 4.0  # room for one chunk per link: the oldest step on a shared link gets it
    assert window_bytes(comm.routes, rows, slack, chunk_bytes=4).tolist() == [4.0, 0.0, 0.0]
    slack[:] = 3.0  # a chunk does not fit: nothing moves
    assert window_bytes(comm.routes, rows, slack, chunk_bytes=4).tolist() == [0.0, 0.0, 0.0]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 40), layers=st.integers(1, 3))
def test_window_bytes_never_overfills_any_window(seed, steps, layers):
    _, comm = platform(4, 4, 4, "er")
    rng = np.random.default_rng(seed)
    src, dst = rng.integers(0, 16, steps), rng.integers(0, 16, steps)
    rows = (src * 16 + dst)[src != dst]
    shape = (layers, len(comm.bandwidth))
    slack = rng.uniform(0, 10, shape) * rng.integers(0, 2, shape)  # many links without room
    per = window_bytes(comm.routes, rows, slack, chunk_bytes=2)  # [layers, steps]
    assert (per % 2 == 0).all() and (per >= 0).all()
    link_bytes = np.asarray(comm.routes[rows].T @ per.T).T if len(rows) else np.zeros_like(slack)
    assert (link_bytes <= slack + 1e-9).all()
    for layer in range(layers):  # a step crossing a link without room for a chunk sends nothing
        blocked = np.asarray(comm.routes[rows][:, slack[layer] < 2].sum(axis=1)).ravel() > 0
        assert (per[layer, blocked] == 0).all()


def test_same_seed_same_result():
    a, _ = run("ni", seed=5, steps=40)
    b, _ = run("ni", seed=5, steps=40)
    for field in ("max_load", "compute_s", "a2a_s", "stall_s", "migrated_bytes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.plans == b.plans


def test_trace_that_does_not_match_the_model_is_an_input_error():
    hw, comm = platform(4, 4, 4, "er")
    base = static_placement(3, 16, 16, 2)
    wrong = np.zeros((5, 3, 8), dtype=np.int64)
    with pytest.raises(InputError) as err:
        simulate_iterations(
            wrong,
            np.ones(5),
            make_balancer("none", BalanceConfig(), comm.hops, 0),
            base,
            comm,
            expert_cost(MODEL, hw),
        )
    assert err.value.field == "trace" and "16 experts" in err.value.message


def test_presets_end_to_end_and_bad_setups():
    summary = run_setup(BalanceSetup(hardware="wsc-8x8", iterations=30, balancer="topology")).summary()
    assert summary["plans"] + summary["rejected_plans"] == 2 and summary["moe_tokens_per_s_per_device"] > 0
    for setup, field in [
        (BalanceSetup(balancer="magic"), "balancer"),
        (
            BalanceSetup(hardware="wsc-8x8", config=BalanceConfig(num_redundant_experts=10**6)),
            "num_redundant_experts",
        ),
        (BalanceSetup(tp=3), "tp"),
    ]:
        with pytest.raises(InputError) as err:
            run_setup(setup)
        assert err.value.field == field


def test_a_plan_that_would_slow_its_own_window_is_rejected():
    hw, comm = platform(1, 4, 1, "baseline")
    base = static_placement(3, 16, 4, 5)
    trace = tiny_trace(4, steps=6)
    cost = expert_cost(MODEL, hw)
    # a second copy of expert 0 on device 1 adds a whole expert's weight reads to a memory-bound die
    forced = simulate_iterations(trace.counts, trace.tokens_per_step(), MoveOnce([(0, 1)]), base, comm, cost)
    guarded = simulate_iterations(
        trace.counts, trace.tokens_per_step(), MoveOnce([(0, 1)], reject_slower_plans=True), base, comm, cost
    )
    assert forced.plans == [2] and forced.compute_s[3:].sum() > guarded.compute_s[3:].sum()
    assert guarded.plans == [] and guarded.rejected_plans == [2] and guarded.migrated_bytes.sum() == 0
    assert guarded.summary()["rejected_plans"] == 1


def test_a_plan_is_applied_only_in_the_layers_it_makes_faster():
    hw, comm = platform(1, 4, 1, "baseline")
    static = static_placement(3, 16, 4, 5)
    history = tiny_trace(4, steps=4).counts
    cost = expert_cost(MODEL, hw)
    # on this memory-bound die a second copy of expert 0 only adds weight reads to device 1
    extra = static.holds.copy()
    extra[:, 0, 1] = True
    current = Placement(np.where(np.arange(3)[:, None, None] == 1, extra, static.holds), 5)  # layer 1 slow
    target = Placement(np.where(np.arange(3)[:, None, None] == 0, extra, static.holds), 5)  # layer 0 slow
    chosen = faster_layers(history, current, target, comm, cost)
    np.testing.assert_array_equal(chosen.holds, static.holds)  # layer 0 kept, layer 1 taken
    assert faster_layers(history, static, target, comm, cost) is None  # no layer gets faster


def test_an_invasive_plan_must_pay_for_its_stall_within_its_horizon():
    hw, comm = platform(1, 4, 1, "baseline")
    static = static_placement(3, 16, 4, 5)  # expert e on device e % 4: four busy experts per die
    history = tiny_trace(4, steps=4).counts
    cost = expert_cost(MODEL, hw)
    # layer 1 now: a fifth expert on device 1 (memory-bound: one more expert's weight reads)
    current = static.holds.copy()
    current[1, 0, 1] = True
    # the plan drops it and swaps experts 4 and 5 between devices 0 and 1: faster, but two copies
    target = static.holds.copy()
    target[1, 4], target[1, 5] = static.holds[1, 5], static.holds[1, 4]
    current, target = Placement(current, 5), Placement(target, 5)
    gain = np.subtract(*(evaluate(history, p, comm, cost).layer_s.mean(axis=0)[1] for p in (current, target)))
    stall = comm.transfer_time(np.array([0, 1]), np.array([1, 0]), np.full(2, cost.weight_bytes))
    assert gain > 0 and stall > gain
    pays = int(np.ceil(stall / gain))  # iterations the plan must serve to win back its stall
    assert faster_layers(history, current, target, comm, cost, horizon=pays - 1) is None
    chosen = faster_layers(history, current, target, comm, cost, horizon=pays)
    np.testing.assert_array_equal(chosen.holds, target.holds)
    np.testing.assert_array_equal(faster_layers(history, current, target, comm, cost).holds, target.holds)


def test_eplb_at_vllm_defaults_never_replans_inside_a_short_run():
    vllm, _ = run("greedy", steps=40, window_size=1000, step_interval=3000)
    static, _ = run("none", steps=40)
    assert vllm.plans == [] and vllm.stall_s.sum() == 0
    np.testing.assert_array_equal(vllm.compute_s, static.compute_s)


@pytest.mark.parametrize("mapping", ["baseline", "er"])
def test_planners_predict_the_simulators_layer_time_on_a_fixed_load(mapping):
    hw, comm = platform(4, 4, 4, mapping)
    cost = expert_cost(MODEL, hw)
    planner = cost.device_cost(a2a_phases=comm.a2a_seconds_per_token())
    counts = tiny_trace(16, steps=1).counts.astype(np.float64)  # one iteration: [1, layers, experts]
    placement = static_placement(3, 16, 16, slots_per_device(16, 16, 16))
    block = evaluate(counts, placement, comm, cost)
    latency = 2 * comm.a2a_latency  # dispatch and combine; the planners leave it out (placement-free)
    predicted = layer_time(placement.holds, counts[0], planner)
    np.testing.assert_allclose(predicted + latency, block.layer_s[0], rtol=1e-5)


def test_runs_on_one_platform_share_one_read_only_trace_draw():
    plain, greedy = (setup_parts(BalanceSetup(balancer=b, iterations=3)) for b in ("none", "greedy"))
    assert plain.trace is greedy.trace and not plain.trace.counts.flags.writeable
    other = setup_parts(BalanceSetup(balancer="none", iterations=3, seed=1))
    assert other.trace is not plain.trace and not np.array_equal(other.trace.counts, plain.trace.counts)


def test_a_balanced_dispatch_levels_every_iteration_and_waits_for_the_counts_where_it_can_level():
    hw, comm = platform(4, 4, 4, "er")
    cost = expert_cost(MODEL, hw)
    counts = tiny_trace(16, steps=6, scenario="mixed").counts
    balanced = BalanceConfig(dispatch="balanced")
    base = static_placement(3, 16, 16, slots_per_device(16, 16, 16))
    plan = make_balancer("greedy", BalanceConfig(), comm.hops, 16).plan(counts.mean(axis=0), base, base)
    even, level = evaluate(counts, plan, comm, cost), evaluate(counts, plan, comm, cost, balanced)
    np.testing.assert_allclose(level.mean_load, even.mean_load, rtol=1e-5)
    assert (level.max_load <= even.max_load * (1 + 1e-5)).all()
    assert level.max_load.mean() < even.max_load.mean()
    # without replicas nothing can be levelled: same loads and times; a layer with a replicated
    # expert waits for the count all-gather before its dispatch
    static = static_placement(3, 16, 16, 2)
    even, level = evaluate(counts, static, comm, cost), evaluate(counts, static, comm, cost, balanced)
    np.testing.assert_allclose(level.max_load, even.max_load, rtol=1e-6)
    np.testing.assert_allclose(level.dispatch_s, even.dispatch_s)
    holds = static.holds.copy()
    holds[0, 0, 1] = True  # layer 0: expert 0 on devices 0 and 1, here without tokens: nothing moves
    one, idle = Placement(holds, 2), counts.copy()
    idle[:, 0, 0] = 0
    even, level = evaluate(idle, one, comm, cost), evaluate(idle, one, comm, cost, balanced)
    assert comm.count_exchange_time > 0
    waited = level.dispatch_s - even.dispatch_s
    solve = balanced.dispatch_solve_us * 1e-6  # the levelling's own solve, on top of the counts
    np.testing.assert_allclose(waited[:, 0], comm.count_exchange_time + solve, rtol=1e-6)
    np.testing.assert_allclose(waited[:, 1:], 0.0, atol=1e-12)
    np.testing.assert_allclose(level.combine_s, even.combine_s)
    free = evaluate(idle, one, comm, cost, dataclasses.replace(balanced, dispatch_solve_us=0.0))
    solved = level.dispatch_s - free.dispatch_s  # dispatch_solve_us is charged where it levels
    np.testing.assert_allclose(solved[:, 0], solve, rtol=1e-6)
    np.testing.assert_allclose(solved[:, 1:], 0.0, atol=1e-12)
