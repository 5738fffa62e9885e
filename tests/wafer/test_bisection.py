"""Property: no collective on a mesh finishes faster than its bisection-bandwidth lower bound."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.mapping import MAPPINGS, expert_placement, make_mapping
from meshserve.wafer.timemodel import collective_time
from meshserve.wafer.topology import topology_for
from meshserve.wafer.traffic import Collective, dispatch

WSC = load_hardware("wsc-8x8")


def cut_lower_bound(traffic: np.ndarray, rows: int, cols: int, bandwidth: float) -> float:
    """max over every straight cut and direction of bytes crossing it / (links across it x bandwidth)."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    bound = 0.0
    for coord, n_links, sides in ((c, rows, cols), (r, cols, rows)):
        for k in range(1, sides):
            a, b = coord < k, coord >= k
            for src, dst in ((a, b), (b, a)):
                bound = max(bound, traffic[np.ix_(src, dst)].sum() / (n_links * bandwidth))
    return bound


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 7),
    cols=st.integers(2, 7),
    seed=st.integers(0, 2**32 - 1),
    density=st.floats(0.05, 1.0),
)
def test_random_traffic_never_beats_the_bisection_bound(rows, cols, seed, density):
    hw = WSC.with_mesh(rows, cols)
    n = rows * cols
    rng = np.random.default_rng(seed)
    traffic = rng.random((n, n)) * (rng.random((n, n)) < density) * 1e6
    np.fill_diagonal(traffic, 0)
    t = collective_time(topology_for(hw), Collective("a2a", traffic, 1))
    assert t.bandwidth_s >= cut_lower_bound(traffic, rows, cols, hw.link_bandwidth) * (1 - 1e-9)


@settings(max_examples=30, deadline=None)
@given(
    side=st.sampled_from([(2, 4), (4, 4), (4, 8), (8, 8)]),
    tp=st.sampled_from([1, 2, 4, 8]),
    kind=st.sampled_from([k for k in MAPPINGS if not k.startswith("her")]),
    seed=st.integers(0, 1000),
)
def test_mapped_all_to_all_never_beats_the_bisection_bound(side, tp, kind, seed):
    rows, cols = side
    hw = WSC.with_mesh(rows, cols)
    m = make_mapping(hw, tp, kind)
    load = np.random.default_rng(seed).random(64)
    d = dispatch(m, expert_placement(64, rows * cols), 16, 8, 14336, load)
    t = collective_time(topology_for(hw), d)
    assert t.bandwidth_s >= cut_lower_bound(d.traffic, rows, cols, hw.link_bandwidth) * (1 - 1e-9)
