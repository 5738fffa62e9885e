"""Where steady-state imbalance comes from: noise floor, forecast, planner, migration lag."""

import numpy as np
import pytest

from meshserve.wafer.balance import BalanceConfig, make_balancer, slots_per_device, static_placement
from meshserve.wafer.balance_setup import comm_model, expert_cost
from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.iteration import simulate_iterations
from meshserve.wafer.steady import gap, max_over_mean
from meshserve.wafer.synthetic import synthetic_trace
from tests.wafer.test_iteration import MODEL


def test_each_cause_adds_to_the_floor_and_the_simulated_run_comes_last():
    hw = load_hardware("wsc-8x8").with_mesh(4, 4)
    comm = comm_model(hw, 4, "er", MODEL, 64)
    trace = synthetic_trace(
        model="tiny",
        num_layers=3,
        num_experts=16,
        top_k=2,
        tokens_per_step=64 * 16,
        steps=80,
        scenario="mixed",
        zipf_exponent=0.6,
        seed=3,
    )
    config = BalanceConfig(window_size=4, imbalance_threshold=0.0, plan_slack=0.1, reject_slower_plans=False)
    balancer = make_balancer("ni-eplb", config, comm.hops, 16)
    base = static_placement(3, 16, 16, slots_per_device(16, 16, 16))
    cost = expert_cost(MODEL, hw)
    run = simulate_iterations(trace.counts, trace.tokens_per_step(), balancer, base, comm, cost)
    steps = gap(trace.counts, "ni-eplb", config, comm.hops, 16, run)
    assert list(steps) == ["floor", "forecast", "planner", "simulated"]
    # a plan made on the very load it is scored on is the best on that mean load
    assert steps["floor"]["on_mean_load"] <= min(steps[k]["on_mean_load"] for k in ("forecast", "planner"))
    for k in ("floor", "forecast", "planner"):  # each iteration's max is at least the mean load's max
        assert steps[k]["per_iteration"] >= steps[k]["on_mean_load"] >= 1.0
    ratio = run.max_load / run.mean_load
    assert steps["simulated"]["per_iteration"] == float(ratio[40:].mean())


def test_max_over_mean_scores_a_plan_per_iteration_and_on_the_mean_load():
    base = static_placement(1, 4, 2, 2)  # experts 0, 2 on device 0; 1, 3 on device 1
    counts = np.array([[[3, 1, 1, 1]], [[1, 1, 1, 3]]], dtype=float)  # device loads (4, 2) then (2, 4)
    per_iteration, on_mean = max_over_mean(base, counts)
    assert per_iteration == pytest.approx(4 / 3) and on_mean == 1.0


def test_a_balanced_dispatch_lowers_every_step_and_still_never_stalls():
    hw = load_hardware("wsc-8x8").with_mesh(4, 4)
    comm = comm_model(hw, 4, "er", MODEL, 64)
    trace = synthetic_trace(
        model="tiny",
        num_layers=3,
        num_experts=16,
        top_k=2,
        tokens_per_step=64 * 16,
        steps=80,
        scenario="mixed",
        zipf_exponent=0.6,
        seed=3,
    )
    base = static_placement(3, 16, 16, slots_per_device(16, 16, 16))
    steps = {}
    for rule in ("even", "balanced"):
        config = BalanceConfig(
            window_size=4, imbalance_threshold=0.0, plan_slack=0.05, dispatch=rule, reject_slower_plans=False
        )
        balancer = make_balancer("ni-eplb", config, comm.hops, 16)
        run = simulate_iterations(
            trace.counts, trace.tokens_per_step(), balancer, base, comm, expert_cost(MODEL, hw)
        )
        assert run.stall_s.sum() == 0 and run.plans
        steps[rule] = gap(trace.counts, "ni-eplb", config, comm.hops, 16, run)
    for k in ("floor", "forecast", "planner", "simulated"):
        assert steps["balanced"][k]["per_iteration"] < steps["even"][k]["per_iteration"]
