"""The costs the paper leaves out, each a knob (presets/costs.yaml): on by default, off = the kinder model."""

import dataclasses

import numpy as np
import pytest

from meshserve.errors import InputError
from meshserve.wafer.balance import BalanceConfig, make_balancer, slots_per_device, static_placement
from meshserve.wafer.balance_setup import BalanceSetup, comm_model, expert_cost, run_marked, run_setup
from meshserve.wafer.capacity import die_memory
from meshserve.wafer.costs import Costs, default_costs
from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.iteration import simulate_iterations
from meshserve.wafer.mapping import make_mapping
from meshserve.wafer.models import load_model
from meshserve.wafer.synthetic import synthetic_trace
from meshserve.wafer.traffic import attention_collectives, output_return

MODEL = dataclasses.replace(
    load_model("deepseek-v3"), name="tiny", num_layers=3, first_dense_layers=0, routed_experts=16, top_k=2
)
ON = default_costs()
OFF = Costs.paper()


def run(name: str, costs: Costs, steps: int = 80, hbm_bandwidth: float | None = None, **config):
    hw = load_hardware("wsc-8x8").with_mesh(4, 4)
    if hbm_bandwidth is not None:  # a die whose HBM is slower than its links
        hw = dataclasses.replace(hw, die=dataclasses.replace(hw.die, hbm_bandwidth=hbm_bandwidth))
    comm = comm_model(hw, 4, "er", MODEL, 64, "bottleneck", costs)
    cfg = BalanceConfig(num_redundant_experts=16, **config)
    base = static_placement(3, 16, 16, slots_per_device(16, 16, 16))
    trace = synthetic_trace(
        model="tiny", num_layers=3, num_experts=16, top_k=2, tokens_per_step=64 * 16, steps=steps,
        scenario="fixed", zipf_exponent=0.6, seed=0,
    )  # fmt: skip
    balancer = make_balancer(name, cfg, comm.hops, 16)
    cost = expert_cost(MODEL, hw)
    return simulate_iterations(trace.counts, trace.tokens_per_step(), balancer, base, comm, cost), comm


def test_defaults_are_the_realistic_values_and_paper_turns_each_off():
    assert ON.output_return and ON.migration_hbm and ON.check_capacity
    assert ON.migration_link_ceiling == pytest.approx(0.69)  # flit model's saturation, 8x8 uniform
    assert not (OFF.output_return or OFF.migration_hbm or OFF.check_capacity)
    assert OFF.migration_link_ceiling == 1.0
    with pytest.raises(InputError, match="migration_link_ceiling"):
        dataclasses.replace(ON, migration_link_ceiling=1.5)


@pytest.mark.parametrize(
    ("mapping", "names"),
    [("er", ["return all-reduce"]), ("her", ["return reduce-scatter", "return all-gather"])],
)
def test_the_output_return_undoes_the_attention_collectives(mapping, names):
    m = make_mapping(load_hardware("wsc-4x8x8"), 4, mapping)
    there, back = attention_collectives(m, 256, 14336), output_return(m, 256, 14336)
    assert [c.name for c in back] == names
    assert sum(c.total_bytes for c in back) == pytest.approx(sum(c.total_bytes for c in there))


def test_the_output_return_is_charged_to_every_moe_layer():
    on, comm = run("none", ON, steps=10)
    off, _ = run("none", OFF, steps=10)
    assert comm.return_time > 0
    np.testing.assert_allclose(on.return_s, comm.return_time * 3)
    np.testing.assert_allclose(on.moe_time_s - off.moe_time_s, on.return_s, rtol=1e-9)
    assert on.summary()["moe_tokens_per_s_per_device"] < off.summary()["moe_tokens_per_s_per_device"]


def test_streamed_migration_pays_hbm_reads_and_writes_and_stays_under_the_ceiling():
    # the tiny model is memory-bound, where replicas only add weight reads: force the plans through
    forced = {"imbalance_threshold": 0.2, "reject_slower_plans": False}
    on, comm = run("ni", ON, **forced)
    loose, _ = run("ni", dataclasses.replace(ON, migration_hbm=False, migration_link_ceiling=1.0), **forced)
    assert on.plans and on.stall_s.sum() == 0
    assert on.migration_hbm_s.sum() > 0  # copies read at the source, written at the destination
    np.testing.assert_allclose(on.summary()["migration_hbm_s"], on.migration_hbm_s.sum())
    assert loose.migration_hbm_s.sum() == 0
    # no link is filled past the ceiling; without it migration runs links to full utilisation
    assert 0 < on.max_link_utilization <= comm.migration_ceiling + 1e-9
    assert loose.max_link_utilization > comm.migration_ceiling


def test_an_invasive_copy_waits_for_the_busiest_dies_hbm():
    slow = dataclasses.replace(ON, output_return=False)
    on, comm = run("greedy", slow, steps=12, reject_slower_plans=False)
    off, _ = run(
        "greedy", dataclasses.replace(slow, migration_hbm=False), steps=12, reject_slower_plans=False
    )
    assert on.plans == off.plans == [10]
    assert on.stall_s[10] >= off.stall_s[10] > 0


def test_mla_latent_cache_is_replicated_per_tp_member_and_gqa_split():
    hw = load_hardware("wsc-4x8x8")
    mla, gqa = load_model("deepseek-v3"), load_model("qwen3-235b-a22b")
    one, four = (die_memory(mla, hw, tp, 2, 64, 4096) for tp in (1, 4))
    assert four.kv_cache == pytest.approx(4 * one.kv_cache)  # 4x the sequences, none split
    one, four = (die_memory(gqa, hw, tp, 2, 64, 4096) for tp in (1, 4))
    assert four.kv_cache == pytest.approx(one.kv_cache)  # 4x the sequences over 4 KV-head shards
    fit = die_memory(mla, hw, 4, 2, 64, 4096)
    assert fit.need == pytest.approx(fit.experts + fit.dense_weights + fit.kv_cache)
    assert fit.experts == pytest.approx(2 * 58 * mla.expert_params * 2)


def test_a_point_that_does_not_fit_is_refused_alone_and_marked_in_tables():
    big = BalanceSetup(hardware="wsc-8x8", balancer="none", tokens_per_device=512, iterations=2)
    with pytest.raises(InputError, match=r"tokens_per_device: .* GB per die .* of 180 GB HBM"):
        run_setup(big)
    row = run_marked(big).summary()
    assert row["fits_memory"] is False and row["memory_need_gb"] > row["memory_capacity_gb"] == 180
    unchecked = dataclasses.replace(big, costs=dataclasses.replace(ON, check_capacity=False))
    assert "fits_memory" not in run_setup(unchecked).summary()
    small = dataclasses.replace(big, tokens_per_device=8)
    assert run_setup(small).summary()["fits_memory"] is True
