"""The iteration simulator's all-to-all, all-reduce and stalls under the fair-share time model."""

import dataclasses

import numpy as np
import pytest

from meshserve.errors import InputError
from meshserve.wafer.balance import BalanceConfig, make_balancer, slots_per_device, static_placement
from meshserve.wafer.balance_setup import BalanceSetup, comm_model, expert_cost
from meshserve.wafer.fair_a2a import FairPhase
from meshserve.wafer.fairshare import fair_share_time
from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.iteration import simulate_iterations
from meshserve.wafer.mapping import make_mapping
from meshserve.wafer.models import load_model
from meshserve.wafer.synthetic import synthetic_trace
from meshserve.wafer.timemodel import collective_time
from meshserve.wafer.topology import topology_for
from meshserve.wafer.traffic import attention_collectives, dispatch

MODEL = dataclasses.replace(
    load_model("deepseek-v3"), name="tiny", num_layers=3, first_dense_layers=0, routed_experts=16, top_k=2
)


def test_the_all_to_all_under_fair_share_matches_a_solve_of_each_traffic_matrix():
    # 2 wafers of 2x4 under hierarchical ER: two domains that share no link; skewed loads, so
    # some rows are drained and the certificate short-cuts others
    hw = load_hardware("wsc-4x8x8").with_mesh(2, 4, wafers=2)
    topo = topology_for(hw)
    mapping = make_mapping(hw, 2, "her")
    unit = dispatch(mapping, np.eye(topo.num_devices), 8, 1, 1e3).traffic
    rng = np.random.default_rng(0)
    load = rng.integers(0, 9, (6, topo.num_devices)).astype(np.float64)
    load[0] = 4.0  # even: certified
    for back in (False, True):
        phase = FairPhase.build(
            topo.incidence, topo.link_bandwidth, unit, 2.0, mapping.domain_of, combine=back
        )
        got = phase.time(load, 0.0)
        for row, seconds in zip(load, got, strict=True):
            traffic = unit / 2.0 * row[None, :]
            want = fair_share_time(topo, traffic.T if back else traffic)
            assert seconds == pytest.approx(want, rel=1e-9)
        assert len(phase.groups) == 2 and all(0 < len(g.solved) < len(load) for g in phase.groups)
        assert len(phase.time(load, 0.0)) == len(load)  # the second call is answered from the cache


def test_a_fair_share_run_is_never_faster_than_the_bottleneck_run():
    hw = load_hardware("wsc-8x8").with_mesh(4, 4)
    trace = synthetic_trace(
        model="tiny",
        num_layers=3,
        num_experts=16,
        top_k=2,
        tokens_per_step=64 * 16,
        steps=24,
        scenario="fixed",
        zipf_exponent=0.6,
        seed=0,
    )
    cfg = BalanceConfig(num_redundant_experts=16, step_interval=8, window_size=8, reject_slower_plans=False)
    base = static_placement(3, 16, 16, slots_per_device(16, 16, 16))
    runs = {}
    for model in ("bottleneck", "fair-share"):
        comm = comm_model(hw, 4, "er", MODEL, 64, model)
        balancer = make_balancer("greedy", cfg, comm.hops, 16)
        runs[model] = simulate_iterations(
            trace.counts, trace.tokens_per_step(), balancer, base, comm, expert_cost(MODEL, hw)
        )
    fast, fair = runs["bottleneck"], runs["fair-share"]
    assert (fair.a2a_s >= fast.a2a_s * (1 - 1e-6)).all()
    assert fair.plans == fast.plans and (fair.stall_s >= fast.stall_s * (1 - 1e-9)).all()
    assert fair.stall_s.sum() > 0
    np.testing.assert_allclose(fair.compute_s, fast.compute_s)  # same plans, same loads
    # the all-reduce is the fair-share time of each attention collective
    topo, mapping = topology_for(hw), make_mapping(hw, 4, "er")
    want = sum(
        collective_time(topo, c, "fair-share").time_s
        for c in attention_collectives(mapping, 4 * 64, MODEL.token_bytes)
    )
    assert fair.allreduce_s[0] == pytest.approx(want * 3)


def test_an_unknown_time_model_is_an_input_error():
    with pytest.raises(InputError, match="time_model"):
        BalanceSetup(time_model="exact").check()
