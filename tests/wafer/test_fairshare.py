"""The max-min fair-share flow model against the bottleneck model."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.wafer.fairshare import certified_bottleneck, crowding, drain
from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.timemodel import collective_time
from meshserve.wafer.topology import topology_for
from meshserve.wafer.traffic import Collective

WSC = load_hardware("wsc-8x8")


def both(topo, traffic):
    c = Collective("x", traffic, 1)
    return collective_time(topo, c, "bottleneck"), collective_time(topo, c, "fair-share")


def test_a_single_flow_runs_at_link_speed():
    topo = topology_for(WSC.with_mesh(1, 4))
    traffic = np.zeros((4, 4))
    traffic[0, 3] = 9e8
    bottleneck, fair = both(topo, traffic)
    assert fair.bandwidth_s == pytest.approx(9e8 / WSC.link_bandwidth) == bottleneck.bandwidth_s
    assert fair.model == "fair-share" and fair.latency_s == bottleneck.latency_s


@pytest.mark.parametrize("side", [4, 8])
def test_uniform_all_to_all_keeps_the_hottest_link_busy_to_the_end(side):
    topo = topology_for(WSC.with_mesh(side, side))
    traffic = np.ones((side * side, side * side)) * 1e5
    np.fill_diagonal(traffic, 0)
    bottleneck, fair = both(topo, traffic)
    assert fair.bandwidth_s == pytest.approx(bottleneck.bandwidth_s, rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), cols=st.integers(2, 4), seed=st.integers(0, 10_000))
def test_fair_share_is_never_faster_than_the_bottleneck(rows, cols, seed):
    n = rows * cols
    rng = np.random.default_rng(seed)
    traffic = rng.pareto(1.0, (n, n)) * (rng.random((n, n)) < 0.4) * 1e6
    np.fill_diagonal(traffic, 0)
    bottleneck, fair = both(topology_for(WSC.with_mesh(rows, cols)), traffic)
    assert fair.bandwidth_s >= bottleneck.bandwidth_s * (1 - 1e-9)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), cols=st.integers(2, 4), seed=st.integers(0, 10_000))
def test_flows_of_equal_size_finish_exactly_at_the_bottleneck_time(rows, cols, seed):
    # Why: a flow on the hottest link l* shares every other link of its route with at most as many
    # flows (per unit of bandwidth) as l*, so progressive filling gives it l*'s equal share; l*'s
    # flows all run at that rate and finish together at bytes(l*) / bandwidth, and every other flow
    # gets at least the equal share of its own most crowded link, so it is done by then too.
    n = rows * cols
    rng = np.random.default_rng(seed)
    traffic = (rng.random((n, n)) < 0.5) * 3e6
    np.fill_diagonal(traffic, 0)
    bottleneck, fair = both(topology_for(WSC.with_mesh(rows, cols)), traffic)
    assert fair.bandwidth_s == pytest.approx(bottleneck.bandwidth_s, rel=1e-9)


def test_flows_slowed_elsewhere_can_leave_the_hottest_link_idle():
    # a line of 6 dies; link 2->3 carries (1, 3) and (2, 4), 2 units each; each of them also shares a
    # link with two short flows, so it runs at 1/3 of a link and 2->3 is a third idle until they end
    topo = topology_for(WSC.with_mesh(1, 6))
    unit = WSC.link_bandwidth * 1e-6
    traffic = np.zeros((6, 6))
    traffic[1, 3] = traffic[2, 4] = 2 * unit
    traffic[0, 2] = traffic[1, 2] = traffic[3, 4] = traffic[3, 5] = 0.8 * unit
    bottleneck, fair = both(topo, traffic)
    assert bottleneck.bandwidth_s == pytest.approx(4e-6)  # 4 units over link 2->3
    # shorts done at 2.4 (rate 1/3 each), then the long two share 2->3: 2 x (2 - 0.8) more
    assert fair.bandwidth_s == pytest.approx(4.8e-6)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), cols=st.integers(2, 4), seed=st.integers(0, 10_000))
def test_a_certified_bottleneck_is_what_the_drain_gives(rows, cols, seed):
    topo = topology_for(WSC.with_mesh(rows, cols))
    n = rows * cols
    rng = np.random.default_rng(seed)
    traffic = np.outer(np.ones(n), rng.pareto(1.0, n) + 0.1) * (rng.random((n, n)) < 0.7) * 1e6
    np.fill_diagonal(traffic, 0)
    src, dst = np.nonzero(traffic)
    if not len(src):
        return
    flows = topo.incidence[src * n + dst].tocsr()
    sizes = traffic[src, dst][:, None]
    bottleneck = (flows.T @ sizes / topo.link_bandwidth[:, None]).max(axis=0)
    fair = drain(flows, sizes, topo.link_bandwidth)
    if certified_bottleneck(sizes, crowding(flows, topo.link_bandwidth), bottleneck)[0]:
        assert fair[0] == pytest.approx(bottleneck[0], rel=1e-9)
    else:  # the bound is only a bound: the drain may still end at the bottleneck time
        assert fair[0] >= bottleneck[0] * (1 - 1e-9)


def test_many_problems_drain_side_by_side_as_they_would_alone():
    topo = topology_for(WSC.with_mesh(2, 3))
    rng = np.random.default_rng(3)
    src, dst = np.nonzero(~np.eye(6, dtype=bool))
    flows = topo.incidence[src * 6 + dst].tocsr()
    sizes = rng.pareto(1.0, (len(src), 5)) * (rng.random((len(src), 5)) < 0.6) * 1e6
    together = drain(flows, sizes, topo.link_bandwidth)
    alone = [drain(flows, sizes[:, [b]], topo.link_bandwidth)[0] for b in range(5)]
    np.testing.assert_allclose(together, alone, rtol=1e-12)
