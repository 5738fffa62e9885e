"""`meshserve wafer noc`: cycles one batch of synthetic traffic takes on a mesh, under every time model.

Units: a link carries one flit per cycle (bandwidth 1 = one flit per cycle, bytes = flits,
seconds = cycles); every die has injection and ejection ports of ``injection_ports`` flits per
cycle. Patterns are BookSim2's (traffic.cpp) on a rows x cols mesh, node id = r * cols + c (BookSim's
x is our column, routed first): transpose (r, c) -> (c, r) (square meshes only), bitcomp (r, c) ->
(k-1-r, k-1-c), bitrev (the node id's bits reversed) and shuffle (its bits rotated left by one; both
need a power-of-two node count), tornado: every coordinate x -> (x + ceil(k/2) - 1) mod k, neighbor:
every coordinate x -> (x + 1) mod k, randperm: a seeded random permutation, uniform: every packet to
a random node, itself included as in BookSim (its RandomInt(nodes - 1) is inclusive: 1/N of the
packets only cross the node's injection and ejection ports), each source's packets spread as evenly
as they go; or a .npy file holding a [nodes, nodes] matrix of packets per (source, destination). A
permutation that maps a node to itself keeps its packets, as BookSim2 does: they cross only that
node's two ports.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from meshserve.errors import InputError, integer, require
from meshserve.wafer.flitsim import simulate_flits
from meshserve.wafer.hardware import Hardware, load_hardware
from meshserve.wafer.limits import check_noc, check_platform
from meshserve.wafer.packetsim import NocParams, simulate_packets
from meshserve.wafer.presets import PRESET_DIR, Section, read_yaml
from meshserve.wafer.timemodel import TIME_MODELS, collective_time
from meshserve.wafer.topology import Topology, topology_for
from meshserve.wafer.traffic import Collective

PATTERNS = ("uniform", "transpose", "bitcomp", "bitrev", "shuffle", "tornado", "neighbor", "randperm")
# "flit-rr": the flit model with round-robin instead of oldest-first VC allocation, a sensitivity check
# (BookSim2's congested permutations fall between the two; docs/wafer.md), not run unless asked for.
NOC_MODELS = (*TIME_MODELS, "packet", "flit", "flit-rr")
DEFAULT_MODELS = NOC_MODELS[:-1]
DEFAULT_ORDER = ("flit", "packet", "bottleneck")  # the most faithful model that ran sets the figure


ROUTERS = ("on-chip", "die-to-die")


def noc_defaults(router: str = "on-chip") -> dict:
    """A router parameter set (presets/noc.yaml): on-chip (BookSim2's defaults) or die-to-die."""
    require(router in ROUTERS, "router", f"unknown {router!r}; allowed: {', '.join(ROUTERS)}")
    data = read_yaml(PRESET_DIR / "noc.yaml", "noc")
    sets = {"die-to-die": data.pop("die_to_die")}
    sets["on-chip"] = data
    return sets[router]


def permutation(pattern: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """[nodes] destination of every node under a BookSim permutation pattern."""
    n = rows * cols
    node = np.arange(n)
    r, c = np.divmod(node, cols)
    if pattern == "transpose":
        require(rows == cols, "pattern", f"transpose needs a square mesh, got {rows}x{cols}")
        return c * cols + r
    if pattern == "bitcomp":
        return (rows - 1 - r) * cols + (cols - 1 - c)
    if pattern in ("bitrev", "shuffle"):
        bits = n.bit_length() - 1
        require(n == 1 << bits, "pattern", f"{pattern} needs a power-of-two node count, got {rows}x{cols}")
        if pattern == "shuffle":
            return ((node << 1) & (n - 1)) | (node >> (bits - 1))
        digits = (node[:, None] >> np.arange(bits)) & 1  # least significant first
        return digits @ (1 << np.arange(bits)[::-1])
    if pattern == "tornado":
        return ((r + (rows + 1) // 2 - 1) % rows) * cols + (c + (cols + 1) // 2 - 1) % cols
    if pattern == "neighbor":
        return ((r + 1) % rows) * cols + (c + 1) % cols
    if pattern == "randperm":
        return np.random.default_rng(seed).permutation(n)
    raise InputError("pattern", f"unknown {pattern!r}; allowed: {', '.join(PATTERNS)} or a .npy file")


def packet_matrix(pattern: str, rows: int, cols: int, packets_per_node: int, seed: int = 0) -> np.ndarray:
    """[nodes, nodes] packets per (source, destination) for one batch."""
    n = rows * cols
    if pattern.endswith(".npy"):
        return read_packet_file(Path(pattern), n)
    out = np.zeros((n, n), dtype=np.int64)
    if pattern == "uniform":
        rng = np.random.default_rng(seed)
        # packet j of a source goes to the (j mod n)-th node of a random order per source
        order = np.argsort(rng.random((n, n)), axis=1)
        dest = order[:, np.arange(packets_per_node) % n]
        np.add.at(out, (np.repeat(np.arange(n), packets_per_node), dest.ravel()), 1)
        return out
    out[np.arange(n), permutation(pattern, rows, cols, seed)] = packets_per_node
    return out


def read_packet_file(path: Path, n: int) -> np.ndarray:
    """A .npy [n, n] matrix of whole packet counts >= 0, each below 2^53; its header (dtype, shape) is
    checked before any data is read, and the data is read through a memory map."""
    require(path.is_file(), "pattern", f"no such file {path}")
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(f)
    except (ValueError, OSError, SyntaxError) as err:
        raise InputError("pattern", f"{path.name} is not a .npy array ({str(err)[:120]})") from None
    require(
        dtype.kind in "biuf" and dtype.fields is None,
        "pattern",
        f"{path.name} must hold integers or floats, got dtype {dtype}",
    )
    require(shape == (n, n), "pattern", f"{path.name} must be [{n}, {n}], got {list(shape)}")
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:  # e.g. a file shorter than its header says
        raise InputError("pattern", f"{path.name} cannot be read ({str(err)[:120]})") from None
    values = np.asarray(matrix, dtype=np.float64)
    require(
        bool(np.isfinite(values).all() and (values >= 0).all() and (values == np.round(values)).all())
        and bool((values < 2.0**53).all()),
        "pattern",
        f"{path.name} must hold whole packet counts in [0, 2^53)",
    )
    return values.astype(np.int64)


def noc_platform(rows: int, cols: int, injection_ports: float, hop_cycles: float) -> Hardware:
    """A mesh in flit units: links of one flit per cycle, ports of ``injection_ports`` flits per cycle."""
    hw = load_hardware("wsc-8x8").with_mesh(rows, cols)
    die = dataclasses.replace(hw.die, injection_bandwidth=float(injection_ports))
    return dataclasses.replace(
        hw, name=f"noc-{rows}x{cols}", die=die, link_bandwidth=1.0, hop_latency=float(hop_cycles)
    )


def packet_routes(topo: Topology, packets: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each packet's channels in travel order, [packets, longest route] padded with -1, and its source.

    A source sends its packets in a random (seeded) order of destinations; packets are numbered
    round-robin over sources (every source's k-th packet before any (k+1)-th), so packet ids
    double as ages for the oldest-first allocation.
    """
    n = topo.num_devices
    src, dst = np.nonzero(packets)
    counts = packets[src, dst]
    flow_src, flow_dst = np.repeat(src, counts), np.repeat(dst, counts)
    shuffle = np.lexsort((np.random.default_rng(seed).random(len(flow_src)), flow_src))
    flow_src, flow_dst = flow_src[shuffle], flow_dst[shuffle]
    rank = np.arange(len(flow_src)) - np.searchsorted(flow_src, flow_src)
    order = np.lexsort((flow_src, rank))
    flow_src, flow_dst = flow_src[order], flow_dst[order]
    pairs, which = np.unique(flow_src * n + flow_dst, return_inverse=True)
    return ordered_routes(topo, pairs)[which], flow_src


def ordered_routes(topo: Topology, pairs: np.ndarray) -> np.ndarray:
    """Links of the routes ``pairs`` (src * N + dst) in travel order, padded with -1.

    Injection port first, then the links by their distance from the source, ejection port last.
    """
    n = topo.num_devices
    inc = topo.incidence[pairs]
    row = np.repeat(np.arange(len(pairs)), np.diff(inc.indptr))
    link = inc.indices
    own = np.flatnonzero(pairs // n == pairs % n)  # a packet to its own node: its two ports only
    if len(own):
        port = {k: np.flatnonzero(topo.link_kind == k) for k in ("inject", "eject")}
        require(len(port["inject"]) == n, "pattern", "packets to their own node need injection ports")
        node = pairs[own] // n
        row = np.concatenate([row, own, own])
        link = np.concatenate(
            [
                link,
                port["inject"][np.argsort(topo.link_src[port["inject"]])][node],
                port["eject"][np.argsort(topo.link_dst[port["eject"]])][node],
            ]
        )
    kind = topo.link_kind[link]
    step = topo.hops[pairs[row] // n, np.minimum(topo.link_src[link], n - 1)].astype(np.float64)
    step = np.where(kind == "inject", -1.0, np.where(kind == "eject", np.inf, step))
    order = np.lexsort((step, row))
    row, link = row[order], link[order]
    col = np.arange(len(row)) - np.searchsorted(row, row)
    out = np.full((len(pairs), int(col.max(initial=-1)) + 1), -1, dtype=np.int64)
    out[row, col] = link
    return out


def noc_cycles(
    rows: int,
    cols: int,
    pattern: str,
    packets_per_node: int,
    flits_per_packet: int,
    models: tuple[str, ...] = DEFAULT_MODELS,
    seed: int = 0,
    injection_ports: int | None = None,
    matrix: np.ndarray | None = None,
    router: str = "on-chip",
) -> dict:
    """Cycles each time model predicts for one batch, and how long each model took (seconds).

    matrix: [nodes, nodes] packets to send instead of the pattern's (the pattern then only names it).

    injection_ports: flits per cycle a node injects and ejects (None: presets/noc.yaml). The
    bottleneck and fair-share models cost it as port bandwidth, the flit and packet models as that
    many one-flit ports (lanes).
    """
    require(rows >= 2 and cols >= 2, "mesh", f"must be at least 2x2, got {rows}x{cols}")
    require(packets_per_node >= 1, "packets_per_node", f"must be >= 1, got {packets_per_node}")
    require(flits_per_packet >= 1, "flits_per_packet", f"must be >= 1, got {flits_per_packet}")
    for m in models:
        require(m in NOC_MODELS, "time_model", f"unknown {m!r}; allowed: {', '.join(NOC_MODELS)}")
    d = Section(noc_defaults(router), "noc")
    params = NocParams(
        flits_per_packet, d.integer("vcs"), d.integer("vc_buffer_flits"), d.integer("hop_cycles")
    )
    ports = d.integer("injection_ports") if injection_ports is None else injection_ports
    integer(ports, "injection_ports", 1, 64)
    hw = noc_platform(rows, cols, ports, d.integer("hop_cycles"))
    # Every dimension that scales memory is estimated before anything is allocated: the mesh, then the
    # batch (packets x flits; a file's counts once its header and values are checked).
    if matrix is not None or pattern.endswith(".npy"):
        check_platform(hw)
        packets = packet_matrix(pattern, rows, cols, packets_per_node, seed) if matrix is None else matrix
        check_noc(hw, float(packets.sum(dtype=np.float64)), flits_per_packet, models, "pattern")
    else:
        check_noc(hw, rows * cols * packets_per_node, flits_per_packet, models, "packets_per_node")
        packets = packet_matrix(pattern, rows, cols, packets_per_node, seed)
    topo = topology_for(hw)
    port = np.isin(topo.link_kind, ("inject", "eject"))
    topo = dataclasses.replace(topo, link_latency=np.where(port, d.integer("port_cycles"), topo.link_latency))
    cycles, seconds = {}, {}
    for model in models:
        start = time.perf_counter()
        if model in ("packet", "flit", "flit-rr"):
            route, source = packet_routes(topo, packets, seed)
            eject = topo.link_kind == "eject"
            width = np.rint(np.maximum(topo.link_bandwidth, 1.0)).astype(np.int64)  # n ports of one flit
            if model == "packet":
                value = simulate_packets(route, source, topo.link_latency, eject, params, width=width)
            else:
                arbiter = "round_robin" if model == "flit-rr" else "age"
                value = simulate_flits(
                    route,
                    source,
                    topo.link_latency,
                    eject,
                    params,
                    credit_cycles=d.integer("credit_cycles"),
                    width=width,
                    vc_arbiter=arbiter,
                )
        else:
            value = collective_time(
                topo, Collective("batch", packets * float(flits_per_packet), 1), model
            ).time_s
        cycles[model] = int(np.ceil(value - 1e-9))
        seconds[model] = time.perf_counter() - start
    return {
        "cycles": cycles,
        "default": next((m for m in DEFAULT_ORDER if m in cycles), models[0]),
        "seconds": seconds,
        "mesh": f"{rows}x{cols}",
        "pattern": pattern,
        "packets_per_node": packets_per_node,
        "flits_per_packet": flits_per_packet,
        "injection_ports": ports,
        "router": router,
    }


def parse_mesh(mesh: str) -> tuple[int, int]:
    """'RxC' -> (R, C)."""
    parts = mesh.lower().split("x")
    require(
        len(parts) == 2 and all(p.isdigit() for p in parts), "mesh", f"must be RxC like 8x8, got {mesh!r}"
    )
    return int(parts[0]), int(parts[1])


def booksim_reference(result: dict) -> float | None:
    """BookSim2's measured cycles for this run when it sent what a reference batch sent, else None."""
    from meshserve.wafer.booksim import reference_cycles  # it builds its matrices with this module

    return reference_cycles(
        result["pattern"],
        result["mesh"],
        result["injection_ports"],
        result["packets_per_node"],
        result["flits_per_packet"],
    )


def run_noc(
    mesh: str,
    pattern: str,
    packets_per_node: int,
    flits_per_packet: int,
    models: tuple[str, ...],
    as_json: bool,
    show,
    injection_ports: int | None = None,
    router: str = "on-chip",
) -> dict:
    """The `meshserve wafer noc` command: compute, then print JSON or tables."""
    import json

    rows, cols = parse_mesh(mesh)
    result = noc_cycles(
        rows,
        cols,
        pattern,
        packets_per_node,
        flits_per_packet,
        models or DEFAULT_MODELS,
        injection_ports=injection_ports,
        router=router,
    )
    reference = booksim_reference(result) if router == "on-chip" else None
    if reference is not None:
        result["booksim2_cycles"] = reference
        result["vs_booksim2"] = {m: c / reference for m, c in result["cycles"].items()}
    if as_json:
        print(json.dumps(result))
    else:
        show(result)
    return result


def print_noc(result: dict) -> None:
    """One row per time model: cycles, ratio to BookSim2 where known, and its speed."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{result['pattern']} on {result['mesh']}: {result['packets_per_node']} packets of "
        f"{result['flits_per_packet']} flits per node, 1 flit/cycle/link, "
        f"{result['injection_ports']} injection port(s) per node, {result['router']} router"
    )
    for col in ("time model", "cycles", "vs BookSim2", "took (s)"):
        table.add_column(col, justify="left" if col == "time model" else "right")
    for model, cycles in result["cycles"].items():
        ratio = result.get("vs_booksim2", {}).get(model)
        table.add_row(
            model + (" (default)" if model == result["default"] else ""),
            f"{cycles:,}",
            "-" if ratio is None else f"{ratio:.2f}x",
            f"{result['seconds'][model]:.3f}",
        )
    Console().print(table)
    if "booksim2_cycles" in result:
        Console().print(
            f"  BookSim2 (cycle-level, from its known bottleneck ratio): {result['booksim2_cycles']:,.0f} "
            "cycles"
        )
