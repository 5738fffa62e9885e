"""Baseline and ER mappings: TP rings, Full Token Domains, expert placement, bad TP."""

import numpy as np
import pytest

from meshserve.errors import InputError
from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.mapping import expert_placement, make_mapping
from meshserve.wafer.topology import topology_for

WSC = load_hardware("wsc-8x8")
SHAPES = [(4, 4), (8, 8), (16, 16), (4, 8), (8, 16), (2, 6)]


def fitting(rows, cols):
    return [
        (rows, cols, tp)
        for tp in (1, 2, 4, 8)
        if (rows * cols) % tp == 0
        and tp <= rows * cols
        and any(rows % h == 0 and cols % (tp // h) == 0 for h in range(1, tp + 1) if tp % h == 0)
    ]


CASES = [case for shape in SHAPES for case in fitting(*shape)]


def bounding_box_area(devices: np.ndarray, cols: int) -> int:
    r, c = np.divmod(devices, cols)
    return int((r.max() - r.min() + 1) * (c.max() - c.min() + 1))


@pytest.mark.parametrize("rows,cols,tp", CASES)
@pytest.mark.parametrize("kind", ["er", "er-bal"])
def test_er_ftds_are_compact_disjoint_blocks(rows, cols, tp, kind):
    m = make_mapping(WSC.with_mesh(rows, cols), tp, kind)
    ftds = m.ftds
    assert ftds.shape == (tp, rows * cols // tp)
    assert sorted(ftds.ravel()) == list(range(rows * cols))  # disjoint and covering
    for members in ftds:
        assert bounding_box_area(members, cols) == len(members)  # a full rectangle: compact


@pytest.mark.parametrize("rows,cols,tp", CASES)
@pytest.mark.parametrize("kind", ["baseline", "er", "er-bal"])
def test_every_group_has_one_member_per_ftd(rows, cols, tp, kind):
    m = make_mapping(WSC.with_mesh(rows, cols), tp, kind)
    assert sorted(m.groups.ravel()) == list(range(rows * cols))
    assert all(sorted(m.ftd_of[g]) == list(range(tp)) for g in m.groups)


@pytest.mark.parametrize("rows,cols,tp", [c for c in CASES if c[2] in (2, 4, 8)])
def test_baseline_groups_are_compact_blocks_with_short_rings(rows, cols, tp):
    m = make_mapping(WSC.with_mesh(rows, cols), tp, "baseline")
    hops = topology_for(WSC.with_mesh(rows, cols)).hops
    ring_steps = hops[m.groups, np.roll(m.groups, -1, axis=1)]
    assert all(bounding_box_area(g, cols) == tp for g in m.groups)
    assert ring_steps.max() <= (1 if tp != 8 or rows % 2 == 0 else 7)


def test_baseline_ftd_spans_3x3_on_4x4_but_er_ftd_is_2x2():
    hw = WSC.with_mesh(4, 4)
    assert bounding_box_area(make_mapping(hw, 4, "baseline").ftds[0], 4) == 9
    assert bounding_box_area(make_mapping(hw, 4, "er").ftds[0], 4) == 4


def test_entwined_ring_neighbours_are_a_block_side_apart():
    for side in (4, 8, 16):
        hw = WSC.with_mesh(side, side)
        m = make_mapping(hw, 4, "er")
        hops = topology_for(hw).hops[m.groups, np.roll(m.groups, -1, axis=1)]
        assert (hops == side // 2).all()


def test_hierarchical_mapping_repeats_the_wafer_layout():
    hw = load_hardware("wsc-4x8x8")
    m = make_mapping(hw, 4, "her")
    assert m.hierarchical and m.num_wafers == 4 and m.num_groups == 64
    assert (m.groups[16:32] == m.groups[:16] + 64).all()
    assert (m.wafer_of[m.groups] == m.wafer_of[m.groups[:, :1]]).all()  # rings stay on a wafer


def test_default_placement_splits_replicas_evenly():
    p = expert_placement(8, 64)
    assert p.shape == (8, 64) and np.allclose(p.sum(axis=1), 1)
    assert ((p > 0).sum(axis=1) == 8).all()  # each of Mixtral's 8 experts on 8 devices
    p = expert_placement(256, 64)
    assert ((p > 0).sum(axis=0) == 4).all()  # 4 experts per die


@pytest.mark.parametrize("tp", [3, 0, 128])
def test_tp_that_does_not_tile_the_mesh_is_an_input_error(tp):
    with pytest.raises(InputError) as err:
        make_mapping(WSC, tp, "er")
    assert err.value.field == "tp" and "allowed: 1, 2, 4, 8" in err.value.message


def test_ep_larger_than_devices_and_hierarchical_on_one_wafer_are_input_errors():
    with pytest.raises(InputError, match="ep"):
        expert_placement(256, 64, ep=128)
    with pytest.raises(InputError, match="mapping"):
        make_mapping(WSC, 4, "her")
    with pytest.raises(InputError, match="allowed: baseline, er, er-bal, her, her-bal"):
        make_mapping(WSC, 4, "snake")


def test_mapping_readings_come_from_data_and_bad_entries_name_the_field(monkeypatch, tmp_path):
    from meshserve.wafer import mapping

    her_ftd = mapping.readings()["her-ftd"]
    assert her_ftd.attention == (("all-reduce", "tp-group"), ("all-gather", "wafers"))
    assert her_ftd.a2a_domain == ("wafer", "ftd") and her_ftd.hierarchical
    (tmp_path / "mappings.yaml").write_text(
        "odd:\n  layout: compact\n  attention: [{op: all-reduce, over: tp-group}]\n  a2a_domain: [rack]\n"
    )
    monkeypatch.setattr(mapping, "PRESET_DIR", tmp_path)
    mapping.readings.cache_clear()
    try:
        with pytest.raises(InputError) as err:
            mapping.readings()
        assert err.value.field == "mappings.odd.a2a_domain" and "ftd, wafer" in err.value.message
        misspelt = "odd:\n  layout: compact\n  attention: [{op: all-reduce, over: tp-group, rings: 2}]\n"
        (tmp_path / "mappings.yaml").write_text(misspelt + "  a2a_domain: [ftd]\n")
        mapping.readings.cache_clear()
        with pytest.raises(InputError) as err:
            mapping.readings()
        assert err.value.field == "mappings.odd.attention.rings" and "unknown field" in err.value.message
    finally:
        mapping.readings.cache_clear()
