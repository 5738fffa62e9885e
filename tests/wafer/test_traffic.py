"""Collectives as traffic matrices: bytes in = bytes out, FTD rule, hierarchical confinement."""

import numpy as np
import pytest

from meshserve.errors import InputError
from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.mapping import expert_placement, make_mapping
from meshserve.wafer.topology import topology_for
from meshserve.wafer.traffic import attention_collectives, combine, device_share, dispatch

WSC = load_hardware("wsc-8x8")
T, B, K = 32, 1000, 8


@pytest.mark.parametrize("kind", ["baseline", "er", "er-bal"])
def test_ring_all_reduce_moves_2_p_minus_1_over_p_messages_per_member(kind):
    m = make_mapping(WSC, 4, kind)
    (ar,) = attention_collectives(m, T, B)
    assert ar.steps == 6
    assert np.allclose(ar.traffic.sum(axis=1), 2 * 3 / 4 * T * B)
    succ = np.roll(m.groups, -1, axis=1)
    assert (ar.traffic[m.groups, succ] > 0).all() and (ar.traffic > 0).sum() == 64


def test_dispatch_follows_the_ftd_rule_and_delivers_every_copy():
    m = make_mapping(WSC, 4, "er")
    load = np.random.default_rng(1).random(256)
    placement = expert_placement(256, 64)
    share = device_share(placement, load)
    d = dispatch(m, placement, T, K, B, load)
    senders = np.flatnonzero(d.traffic[:, 9].round(9))
    assert set(m.ftd_of[senders]) == {m.ftd_of[9]}  # only x's own FTD sends to x
    # each of the G groups delivers T*K*share[x] copies to x; x's own group's copy is local
    assert np.allclose(d.traffic.sum(axis=0), (m.num_groups - 1) * T * K * B * share)
    assert np.allclose(combine(d).traffic, d.traffic.T)


def test_hierarchical_dispatch_never_leaves_a_wafer():
    hw = load_hardware("wsc-4x8x8")
    m = make_mapping(hw, 4, "her")
    d = dispatch(m, expert_placement(256, 256), T, K, B)
    cross = m.wafer_of[:, None] != m.wafer_of[None, :]
    assert d.traffic[cross].sum() == 0
    # every token of all 64 groups reaches its K experts; a die's own share is local
    per_device = 64 * T * K * B / 256
    assert np.allclose(d.traffic.sum(axis=0), per_device * (1 - 1 / 64))
    rs, ag = attention_collectives(m, T, B)
    assert (ag.traffic[~cross] == 0).all() and ag.traffic.sum() == pytest.approx(256 * 3 * T * B / 4)


def test_placement_with_replicas_splits_traffic_between_them():
    placement = np.zeros((2, 64))
    placement[0, [0, 63]] = 0.5  # expert 0 replicated on two corners
    placement[1, 10] = 1.0
    share = device_share(placement, np.array([3.0, 1.0]))
    assert share[0] == share[63] == pytest.approx(0.375) and share[10] == pytest.approx(0.25)


def test_bad_placement_and_load_are_input_errors():
    m = make_mapping(WSC, 4, "er")
    with pytest.raises(InputError, match="placement"):
        dispatch(m, np.ones((4, 64)), T, K, B)
    with pytest.raises(InputError, match="expert_load"):
        dispatch(m, expert_placement(4, 64), T, K, B, expert_load=np.array([1.0, -1, 0, 0]))


def test_her_ftd_all_to_all_stays_inside_each_wafers_ftd_blocks():
    hw = load_hardware("wsc-4x8x8")
    m = make_mapping(hw, 4, "her-ftd")
    topo = topology_for(hw)
    d = dispatch(m, expert_placement(256, 256), T, K, B)
    domain = m.wafer_of * 4 + m.ftd_of
    assert d.traffic[domain[:, None] != domain[None, :]].sum() == 0
    loads = topo.link_loads(d.traffic + combine(d).traffic)
    src, dst = topo.link_src, topo.link_dst
    on_mesh = (src < 256) & (dst < 256)
    inside = on_mesh & (domain[np.minimum(src, 255)] == domain[np.minimum(dst, 255)])
    assert loads[~inside].sum() == 0 and loads[inside].sum() > 0  # no byte on a border or wafer link
    # every token of all 64 groups reaches its K experts: each die holds its group's and its
    # counterparts' full tokens (4 wafers x T), one holder per token in every block
    assert np.allclose(d.traffic.sum(axis=0), 64 * T * K * B / 256 * (1 - 1 / 16))
    ar, ag = attention_collectives(m, T, B)
    assert ar.name == "all-reduce" and ag.name == "wafer all-gather"
    assert ag.traffic.sum() == pytest.approx(256 * 3 * T * B)  # full tokens, not shards
