"""Problem sizes estimated before allocating: refuse a run that would not fit in memory, saying why.

The simulator's memory grows with the routing table (every ordered device pair times its route
length) and, for iteration-level runs, with iterations x MoE layers x (experts + links). Both are
known from the presets alone, so the check costs microseconds and runs before any array exists.
Constants live in presets/limits.yaml.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import lru_cache

from meshserve.errors import InputError, number
from meshserve.machine import available_memory
from meshserve.wafer.hardware import Hardware
from meshserve.wafer.presets import PRESET_DIR, Section, read_yaml

GIB = 1 << 30
ENV_BUDGET = "MESHSERVE_WAFER_MEMORY_GIB"


@dataclass(frozen=True)
class Limits:
    memory_budget_gib: float
    memory_budget_fraction: float
    base_mib: float
    bytes_per_route_entry: float
    bytes_per_device_pair: float
    bytes_per_trace_entry: float
    bytes_per_link_step: float
    bytes_per_expert_device: float
    bytes_per_packet: float
    bytes_per_packet_hop: float
    bytes_per_channel_cycle: float


@lru_cache(maxsize=1)
def limits() -> Limits:
    """presets/limits.yaml, validated like every preset (unknown keys refused)."""
    top = Section(read_yaml(PRESET_DIR / "limits.yaml", "limits"), "limits")
    out = Limits(**{f: top.number(f) for f in Limits.__dataclass_fields__})
    top.reject_unknown()
    return out


def budget_bytes() -> int:
    """The memory a run may use: the configured budget, capped by a share of what is available."""
    lim = limits()
    gib = lim.memory_budget_gib
    if os.environ.get(ENV_BUDGET):
        try:
            gib = float(os.environ[ENV_BUDGET])
        except ValueError:
            gib = float("nan")
        gib = number(gib, ENV_BUDGET, 0, low_open=True)
    return int(min(gib * GIB, available_memory() * lim.memory_budget_fraction))


def route_entries(hw: Hardware) -> int:
    """Entries of the routing incidence matrix: sum over ordered device pairs of the route's links."""
    n = hw.num_devices
    if hw.kind != "mesh":
        return 2 * n * n
    r, c = hw.rows, hw.cols
    mean_hops = (r * r - 1) / (3 * r) + (c * c - 1) / (3 * c)  # Manhattan distance of two random dies
    return int(n * n * mean_hops + 2 * n * n)  # plus the off-wafer up and down ports


def topology_bytes(hw: Hardware) -> int:
    """Estimated peak bytes of building and using a platform's routes (link loads, hop counts)."""
    lim = limits()
    n = hw.num_devices
    routes = route_entries(hw) * lim.bytes_per_route_entry + n * n * lim.bytes_per_device_pair
    return int(lim.base_mib * (1 << 20) + routes)


def iteration_bytes(hw: Hardware, iterations: int, moe_layers: int, experts: int) -> int:
    """Estimated peak bytes of an iteration-level run (trace, per-step link loads), routes included."""
    lim = limits()
    links = 4 * hw.num_devices  # mesh: at most 4 links per die; switch: up and down, twice
    per_step = moe_layers * (experts * lim.bytes_per_trace_entry + links * lim.bytes_per_link_step)
    return topology_bytes(hw) + int(iterations * per_step)


def layer_bytes(hw: Hardware, experts: int) -> int:
    """Estimated peak bytes of one MoE layer's simulation: routes plus the [experts, devices] arrays."""
    return topology_bytes(hw) + int(experts * hw.num_devices * limits().bytes_per_expert_device)


def noc_bytes(hw: Hardware, packets: float, flits_per_packet: int, models: tuple[str, ...]) -> int:
    """Estimated peak bytes of `wafer noc`: routes, the batch's packets and, for the cycle-level models,
    each packet's route (injection port, at most rows + cols - 2 links, ejection port) and the packet
    model's per-cycle ring buffers of one packet's flits over every channel."""
    lim = limits()
    estimate = topology_bytes(hw) + packets * lim.bytes_per_packet
    if {"packet", "flit", "flit-rr"} & set(models):
        estimate += packets * (hw.rows + hw.cols + 2) * lim.bytes_per_packet_hop
    if "packet" in models:
        channels = 6 * hw.num_devices  # at most 4 mesh links per die, plus its two ports
        estimate += (flits_per_packet + 2) * channels * lim.bytes_per_channel_cycle
    return int(min(estimate, 1 << 80))


def check_fits(estimate: int, what: str, field: str) -> None:
    """InputError(field) with the estimate when ``estimate`` bytes exceed the budget."""
    budget = budget_bytes()
    if estimate > budget:
        raise InputError(
            field,
            f"{what} needs about {estimate / GIB:.1f} GiB (estimated before allocating), "
            f"more than the {budget / GIB:.1f} GiB budget; use a smaller problem or "
            f"raise {ENV_BUDGET} (README: Limits and errors)",
        )


def largest_square_mesh(hw: Hardware) -> int:
    """Side k of the largest k x k mesh (with hw's wafers, dies and links) whose routes fit the budget."""
    budget, k = budget_bytes(), 1
    while topology_bytes(dataclasses.replace(hw, kind="mesh", rows=k + 1, cols=k + 1)) <= budget:
        k += 1
    return k


def check_platform(hw: Hardware) -> None:
    """Refuse a platform whose routes alone would not fit (field ``hardware``)."""
    if topology_bytes(hw) <= budget_bytes():
        return
    what = f"{hw.name} ({hw.num_devices} devices)"
    if hw.kind == "mesh":
        k = largest_square_mesh(hw)
        wafers = f" x {hw.wafers} wafers" if hw.wafers > 1 else ""
        what += f" (largest square mesh that fits: {k}x{k}{wafers})"
    check_fits(topology_bytes(hw), what, "hardware")


def check_layer(hw: Hardware, experts: int) -> None:
    """Refuse a layer simulation that would not fit (field ``model`` once the platform fits)."""
    check_platform(hw)
    check_fits(layer_bytes(hw, experts), f"{experts} routed experts on {hw.num_devices} devices", "model")


def check_noc(
    hw: Hardware, packets: float, flits_per_packet: int, models: tuple[str, ...], field: str
) -> None:
    """Refuse a noc run that would not fit: the mesh first, then the batch (``field`` names where its
    packets come from; flits_per_packet when one-flit packets would have fit)."""
    check_platform(hw)
    estimate = noc_bytes(hw, packets, flits_per_packet, models)
    if estimate > budget_bytes() and noc_bytes(hw, packets, 1, models) <= budget_bytes():
        field = "flits_per_packet"
    check_fits(
        estimate,
        f"{packets:.3g} packets of {flits_per_packet} flits on {hw.rows}x{hw.cols} ({', '.join(models)})",
        field,
    )


def check_iterations(hw: Hardware, iterations: int, moe_layers: int, experts: int) -> None:
    """Refuse an iteration-level run that would not fit (field ``iterations`` once the platform fits)."""
    check_platform(hw)
    check_fits(
        iteration_bytes(hw, iterations, moe_layers, experts),
        f"{iterations} iterations x {moe_layers} MoE layers x {experts} experts on {hw.name}",
        "iterations",
    )
