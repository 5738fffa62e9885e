"""Routes and link loads of mesh, multi-wafer and switch platforms."""

import numpy as np
import pytest

from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.topology import topology_for

WSC = load_hardware("wsc-8x8")


def manhattan(rows: int, cols: int) -> np.ndarray:
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.abs(r[:, None] - r[None]) + np.abs(c[:, None] - c[None])


@pytest.mark.parametrize("rows,cols", [(1, 5), (4, 4), (3, 7), (8, 8), (6, 10), (16, 16)])
def test_xy_path_length_is_manhattan_distance(rows, cols):
    topo = topology_for(WSC.with_mesh(rows, cols))
    assert (topo.hops == manhattan(rows, cols)).all()


def test_xy_route_goes_along_the_row_first_then_the_column():
    topo = topology_for(WSC.with_mesh(4, 4))
    src, dst = 1, 14  # (0,1) -> (3,2)
    links = topo.incidence[src * 16 + dst].indices
    names = {topo.link_name(i) for i in links}
    assert names == {"(0,1)->(0,2)", "(0,2)->(1,2)", "(1,2)->(2,2)", "(2,2)->(3,2)"}


def test_link_loads_conserve_bytes():
    topo = topology_for(WSC.with_mesh(5, 7))
    traffic = np.random.default_rng(0).random((35, 35)) * 1e6
    np.fill_diagonal(traffic, 0)
    assert topo.link_loads(traffic).sum() == pytest.approx((traffic * topo.hops).sum(), rel=1e-12)


def test_multi_wafer_routes_cross_through_the_position_switch():
    hw = load_hardware("wsc-4x8x8")
    topo = topology_for(hw)
    local = manhattan(8, 8)
    # die (0,0) of wafer 0 to die (7,7) of wafer 2: 14 mesh hops on wafer 0, then up and down
    assert topo.hops[0, 2 * 64 + 63] == local[0, 63] + 2
    assert topo.hops[64 + 5, 64 + 9] == local[5, 9]
    path = topo.incidence[0 * 256 + 2 * 64 + 63].indices
    kinds = sorted(topo.link_kind[path])
    assert kinds.count("wafer-up") == 1 and kinds.count("wafer-down") == 1
    assert topo.link_bandwidth[topo.link_kind == "wafer-up"][0] == pytest.approx(hw.wafer_link_bandwidth)


@pytest.mark.parametrize("name,nodes", [("nvl72", 1), ("dgx-b200", 8)])
def test_switch_platforms_route_through_one_uplink_and_one_downlink(name, nodes):
    topo = topology_for(load_hardware(name))
    n = topo.num_devices
    assert (topo.hops == 2 * (1 - np.eye(n, dtype=int))).all()
    per = n // nodes
    kinds = topo.link_kind[topo.incidence[0 * n + (n - 1)].indices]
    assert set(kinds) == ({"nvlink-up", "nvlink-down"} if nodes == 1 else {"nic-up", "nic-down"})
    assert set(topo.link_kind[topo.incidence[0 * n + per - 1].indices]) == {"nvlink-up", "nvlink-down"}


def test_topologies_are_cached_per_hardware():
    assert topology_for(WSC) is topology_for(load_hardware("wsc-8x8"))


def test_injection_ports_carry_what_a_die_sends_and_bind_when_narrow():
    from meshserve.wafer.timemodel import collective_time
    from meshserve.wafer.traffic import Collective

    hw = WSC.with_mesh(4, 4)
    plain, ported = topology_for(hw), topology_for(hw.with_injection(450e9))
    assert (ported.hops == plain.hops).all()  # ports are not hops
    assert ported.num_links == plain.num_links + 2 * 16
    traffic = np.zeros((16, 16))
    traffic[5, [4, 6, 1, 9]] = 1e6  # one die sends 1 MB to each neighbour
    loads = ported.link_loads(traffic)
    inject = np.flatnonzero(ported.link_kind == "inject")
    assert loads[inject[5]] == 4e6 and ported.link_name(inject[5]) == "(1,1) inject"
    assert np.allclose(loads[: plain.num_links], plain.link_loads(traffic))
    c = Collective("fan-out", traffic, 1)
    assert collective_time(plain, c).bandwidth_s == pytest.approx(1e6 / 900e9)  # its four links
    assert collective_time(ported, c).bandwidth_s == pytest.approx(4e6 / 450e9)  # its port
