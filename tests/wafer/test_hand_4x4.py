"""A 4x4 mesh with TP=4, link loads worked out by hand.

Dies are numbered row-major, (r,c) = 4r + c. M = one TP group's message (tokens x hidden x 2 B).
A ring all-reduce sends 2 x (p-1)/p x M = 1.5 M from each member to its ring successor.
"""

import numpy as np
import pytest

from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.mapping import expert_placement, make_mapping
from meshserve.wafer.topology import topology_for
from meshserve.wafer.traffic import attention_collectives, dispatch

HW = load_hardware("wsc-8x8").with_mesh(4, 4)
TOPO = topology_for(HW)
TOKENS, TOKEN_BYTES, TOP_K = 64, 7168 * 2, 8
M = TOKENS * TOKEN_BYTES


def loads_by_name(traffic):
    loads = TOPO.link_loads(traffic)
    return {TOPO.link_name(i): loads[i] for i in range(TOPO.num_links)}


def test_er_all_reduce_by_hand():
    m = make_mapping(HW, 4, "er")
    # group at offset (0,0) of every 2x2 block: ring 0 -> 2 -> 10 -> 8 -> 0, each step 2 hops
    assert list(m.groups[0]) == [0, 2, 10, 8]
    loads = loads_by_name(attention_collectives(m, TOKENS, TOKEN_BYTES)[0].traffic)
    # row 0 eastwards: (0,0)->(0,1) only ring 0->2; (0,1)->(0,2) rings 0->2 and 1->3; (0,2)->(0,3) ring 1->3
    assert loads["(0,0)->(0,1)"] == pytest.approx(1.5 * M)
    assert loads["(0,1)->(0,2)"] == pytest.approx(3.0 * M)
    assert loads["(0,2)->(0,3)"] == pytest.approx(1.5 * M)
    assert loads["(0,1)->(0,0)"] == 0  # every ring turns the same way: row 0 is never used westwards
    # column 2 southwards: 2 -> 10 uses (0,2)->(1,2)->(2,2); 6 -> 14 uses (1,2)->(2,2)->(3,2)
    assert loads["(0,2)->(1,2)"] == pytest.approx(1.5 * M)
    assert loads["(1,2)->(2,2)"] == pytest.approx(3.0 * M)
    assert sum(loads.values()) == pytest.approx(16 * 2 * 1.5 * M)  # 16 ring steps of 2 hops
    assert max(loads.values()) == pytest.approx(3.0 * M)  # 2x the baseline's 1.5 M


def test_baseline_all_reduce_by_hand():
    m = make_mapping(HW, 4, "baseline")
    assert list(m.groups[0]) == [0, 1, 5, 4]  # 2x2 block, 1-hop ring
    loads = loads_by_name(attention_collectives(m, TOKENS, TOKEN_BYTES)[0].traffic)
    assert loads["(0,0)->(0,1)"] == pytest.approx(1.5 * M)
    assert loads["(0,1)->(0,2)"] == 0  # no ring crosses a block boundary
    assert max(loads.values()) == pytest.approx(1.5 * M)


def dispatch_traffic(kind):
    placement = expert_placement(16, 16)  # one expert per die, uniform load
    return dispatch(make_mapping(HW, 4, kind), placement, TOKENS, TOP_K, TOKEN_BYTES).traffic


UNIT = TOKENS * TOP_K * TOKEN_BYTES / 16  # one group's bytes for one die's expert


def test_er_dispatch_by_hand():
    loads = loads_by_name(dispatch_traffic("er"))
    # FTD {0,1,4,5}: 0 sends to 1 and (X first) to 5 over (0,0)->(0,1); 4 and 1 reach (1,0) from 4's
    # row and 1's column: every directed link inside a block carries exactly 2 units
    assert loads["(0,0)->(0,1)"] == pytest.approx(2 * UNIT)
    assert loads["(0,0)->(1,0)"] == pytest.approx(2 * UNIT)
    assert loads["(1,1)->(1,0)"] == pytest.approx(2 * UNIT)
    assert loads["(0,1)->(0,2)"] == 0  # links between FTDs stay cold during the all-to-all
    assert loads["(1,1)->(2,1)"] == 0
    assert sum(loads.values()) == pytest.approx(4 * 8 * 2 * UNIT)  # 4 blocks x 8 links x 2 units


def test_baseline_dispatch_by_hand():
    loads = loads_by_name(dispatch_traffic("baseline"))
    # FTD 0 = {0, 2, 8, 10}; FTD 1 = {1, 3, 9, 11}. (0,1)->(0,2) carries 0->2, 0->10, 1->3, 1->11
    assert loads["(0,0)->(0,1)"] == pytest.approx(2 * UNIT)
    assert loads["(0,1)->(0,2)"] == pytest.approx(4 * UNIT)
    assert max(loads.values()) == pytest.approx(4 * UNIT)  # twice ER's hottest link
    assert np.isclose(sum(loads.values()), (dispatch_traffic("baseline") * TOPO.hops).sum())
