"""A platform cut into a prefill side and a decode side, each a platform of its own."""

import numpy as np
import pytest

from meshserve.errors import InputError
from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.split import split_platform, splits
from meshserve.wafer.topology import topology_for

WSC = load_hardware("wsc-8x8")
NVL = load_hardware("nvl72")


def test_splits_are_whole_mesh_rows_or_gpus_tiled_by_tp_on_both_sides():
    assert splits(WSC, 4) == [8, 16, 24, 32, 40, 48, 56]
    assert splits(WSC, 16) == [16, 32, 48]  # a 2x8 block of rows is the smallest a 4x4 group tiles
    assert splits(NVL, 8) == list(range(8, 72, 8))
    with pytest.raises(InputError, match="hardware"):
        splits(load_hardware("wsc-4x8x8"), 4)


@pytest.mark.parametrize("hw", [WSC, NVL], ids=lambda h: h.name)
def test_each_side_routes_its_collectives_on_the_full_platforms_links(hw):
    pre, dec = split_platform(hw, splits(hw, 4)[1], 4, "er")
    full = topology_for(hw)
    rng = np.random.default_rng(0)
    for side in (pre, dec):
        local = rng.random((side.devices.size, side.devices.size))
        np.fill_diagonal(local, 0)
        traffic = np.zeros((hw.num_devices, hw.num_devices))
        traffic[np.ix_(side.devices, side.devices)] = local
        embedded = np.zeros(full.num_links)
        embedded[side.links] = topology_for(side.hw).link_loads(local)
        assert embedded == pytest.approx(full.link_loads(traffic))
