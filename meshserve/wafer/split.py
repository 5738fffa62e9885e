"""A platform cut in two: the prefill side (the first dies) and the decode side (the rest).

Mesh platforms are cut into whole rows, switch platforms into GPUs of their one node. Each side is
a platform of its own (``Hardware.with_mesh``): an XY route between two dies of a block of rows
never leaves the block, so a side's collectives load exactly the full platform's links, and
``Side.links`` says which.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from meshserve.errors import InputError
from meshserve.wafer.hardware import Hardware
from meshserve.wafer.mapping import Mapping, block_shape, make_mapping
from meshserve.wafer.topology import Topology, topology_for


@dataclass(frozen=True, eq=False)
class Side:
    """One side of a split platform, simulated as a platform of its own."""

    hw: Hardware
    mapping: Mapping
    devices: np.ndarray  # [n] the full platform's id of each of its dies
    links: np.ndarray  # [its links] the full platform's id of each of its links


def _supported(hw: Hardware) -> None:
    if (hw.kind == "mesh" and hw.wafers > 1) or (hw.kind == "switch" and hw.devices > hw.devices_per_node):
        raise InputError(
            "hardware",
            f"a disaggregated deployment is modelled on one wafer or one switch node; {hw.name} has "
            f"{hw.num_devices // hw.devices_per_wafer} {'wafers' if hw.kind == 'mesh' else 'nodes'}",
        )


def _part(hw: Hardware, dies: int) -> Hardware:
    """The platform of ``dies`` dies cut from hw: whole rows of a mesh, GPUs of one switch node."""
    if hw.kind == "mesh":
        return hw.with_mesh(dies // hw.cols, hw.cols, 1)
    return dataclasses.replace(hw, name=f"{hw.name}[{dies}]", devices=dies, devices_per_node=dies)


def splits(hw: Hardware, tp: int) -> list[int]:
    """Prefill die counts hw allows with TP groups of tp: whole mesh rows, both sides tiled by TP."""
    _supported(hw)
    n, unit = hw.num_devices, hw.cols if hw.kind == "mesh" else 1

    def tiles(dies: int) -> bool:
        shape = (dies // hw.cols, hw.cols) if hw.kind == "mesh" else (1, dies)
        return block_shape(*shape, tp) is not None

    return [d for d in range(unit, n, unit) if tiles(d) and tiles(n - d)]


def _embed(full: Topology, part: Topology, devices: np.ndarray) -> np.ndarray:
    """The full platform's id of every link of ``part`` (its dies at ``devices``; a switch node
    past its dies keeps its offset past the full platform's dies)."""
    kinds = np.unique(full.link_kind)
    size = int(max(full.link_src.max(), full.link_dst.max())) + 1

    def node(ids: np.ndarray) -> np.ndarray:
        inside = ids < part.num_devices
        return np.where(
            inside, devices[np.minimum(ids, part.num_devices - 1)], full.num_devices + ids - part.num_devices
        )

    def keys(src: np.ndarray, dst: np.ndarray, kind: np.ndarray) -> np.ndarray:
        return (src * size + dst) * len(kinds) + np.searchsorted(kinds, kind)

    ref = keys(full.link_src, full.link_dst, full.link_kind)
    order = np.argsort(ref)
    want = keys(node(part.link_src), node(part.link_dst), part.link_kind)
    at = order[np.minimum(np.searchsorted(ref[order], want), len(ref) - 1)]
    assert (ref[at] == want).all(), "a side's link is not a link of the full platform"
    return at


def split_platform(hw: Hardware, prefill_dies: int, tp: int, mapping: str) -> tuple[Side, Side]:
    """The prefill side (the first ``prefill_dies`` dies) and the decode side (the rest)."""
    allowed = splits(hw, tp)
    if prefill_dies not in allowed:
        raise InputError(
            "prefill_dies",
            f"a disaggregated deployment needs prefill and decode dies, whole "
            f"{'mesh rows' if hw.kind == 'mesh' else 'GPUs'} tiled by TP={tp} groups on each side; allowed "
            f"on {hw.name}: {', '.join(map(str, allowed)) or 'none'}; got {prefill_dies}",
        )
    full = topology_for(hw)
    sides = []
    for first, dies in ((0, prefill_dies), (prefill_dies, hw.num_devices - prefill_dies)):
        sub = _part(hw, dies)
        devices = np.arange(first, first + dies)
        sides.append(
            Side(sub, make_mapping(sub, tp, mapping), devices, _embed(full, topology_for(sub), devices))
        )
    return sides[0], sides[1]
