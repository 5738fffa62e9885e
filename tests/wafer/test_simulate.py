"""One MoE layer end to end: phases, hot/cold complementarity, determinism."""

import numpy as np
import pytest

from meshserve.wafer.balance_setup import comm_model
from meshserve.wafer.costs import Costs
from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.mapping import make_mapping
from meshserve.wafer.models import load_model
from meshserve.wafer.simulate import simulate_layer, step_s
from meshserve.wafer.topology import topology_for

WSC = load_hardware("wsc-8x8")
V3 = load_model("deepseek-v3")


def test_layer_phases_and_totals():
    m = make_mapping(WSC, 4, "er")
    layer = simulate_layer(WSC, V3, m, 64)
    names = ["attention", "all-reduce", "dispatch", "experts", "combine", "return all-reduce"]
    assert [p.name for p in layer.phases] == names
    assert layer.total_s == pytest.approx(sum(p.time_s for p in layer.phases))
    assert layer.comm_s == pytest.approx(layer.attention_comm_s + layer.all_to_all_s + layer.return_s)
    assert all(p.model in ("bottleneck", "roofline") for p in layer.phases)
    assert step_s(WSC, V3, m, layer, 64) > V3.num_moe_layers * layer.total_s


def test_er_all_to_all_leaves_links_between_ftds_cold():
    topo = topology_for(WSC)
    m = make_mapping(WSC, 4, "er")
    layer = simulate_layer(WSC, V3, m, 64)
    between = m.ftd_of[topo.link_src] != m.ftd_of[topo.link_dst]
    assert layer.moe_loads[between].sum() == 0
    assert layer.attention_loads[between].sum() > 0  # ...which is where the entwined rings run


def test_balanced_rings_halve_the_hottest_all_reduce_link():
    loads = {
        k: simulate_layer(WSC, V3, make_mapping(WSC, 4, k), 64).phase("all-reduce").hottest_bytes
        for k in ("baseline", "er", "er-bal")
    }
    assert loads["er"] == pytest.approx(4 * loads["baseline"])
    assert loads["er-bal"] == pytest.approx(2 * loads["baseline"])


def test_hierarchical_layer_keeps_the_all_to_all_on_the_wafer():
    hw = load_hardware("wsc-4x8x8")
    layer = simulate_layer(hw, V3, make_mapping(hw, 4, "her"), 64)
    topo = topology_for(hw)
    assert [p.name for p in layer.phases][1:3] == ["reduce-scatter", "wafer all-gather"]
    assert layer.moe_loads[topo.link_kind != "mesh"].sum() == 0


def test_results_are_deterministic():
    hw = load_hardware("wsc-4x8x8")
    runs = [simulate_layer(hw, V3, make_mapping(hw, 4, "her-bal"), 32) for _ in range(2)]
    assert [p.time_s for p in runs[0].phases] == [p.time_s for p in runs[1].phases]
    assert np.array_equal(runs[0].moe_loads, runs[1].moe_loads)
    assert np.array_equal(runs[0].expert_s, runs[1].expert_s)


def test_skewed_expert_load_slows_the_hottest_device():
    m = make_mapping(WSC, 4, "er")
    load = np.ones(256)
    load[:4] = 20.0  # device 0 hosts experts 0, 64, 128, 192; make experts 0..3 hot
    even = simulate_layer(WSC, V3, m, 64)
    skew = simulate_layer(WSC, V3, m, 64, expert_load=load)
    assert skew.phase("experts").time_s > even.phase("experts").time_s
    assert skew.phase("dispatch").time_s > even.phase("dispatch").time_s


@pytest.mark.parametrize(
    "hardware,mapping", [("wsc-8x8", "er"), ("wsc-8x8", "baseline"), ("wsc-4x8x8", "her")]
)
def test_the_output_return_is_the_iteration_models_return(hardware, mapping):
    """`simulate` and `reproduce comm` charge the return `reproduce balance` charges (one function)."""
    hw = load_hardware(hardware)
    layer = simulate_layer(hw, V3, make_mapping(hw, 4, mapping), 64)
    comm = comm_model(hw, 4, mapping, V3, 64)
    assert layer.return_s > 0 and layer.return_s == pytest.approx(comm.return_time, rel=1e-12)
    # the attention collectives undone on the same rings: as long as the reduction itself
    assert layer.return_s == pytest.approx(layer.attention_comm_s, rel=0.05)


def test_the_paper_costs_leave_the_return_out():
    m = make_mapping(WSC, 4, "er")
    on, off = simulate_layer(WSC, V3, m, 64), simulate_layer(WSC, V3, m, 64, costs=Costs.paper())
    assert off.return_s == 0 and [p.name for p in off.phases][-1] == "combine"
    assert on.comm_s - off.comm_s == pytest.approx(on.return_s)
    assert on.attention_comm_s == pytest.approx(off.attention_comm_s)
