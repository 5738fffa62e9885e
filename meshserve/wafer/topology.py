"""Links and routes of a platform, as arrays.

A topology is a set of DIRECTED links (bandwidth, latency each) plus a deterministic route for
every ordered device pair. Routes are stored once as a sparse incidence matrix
``incidence[src * N + dst, link] = 1`` so the link loads of any traffic matrix ``T[src, dst]``
(bytes) are one sparse mat-vec: ``loads = incidence.T @ T.ravel()``.

Meshes use dimension-order (XY) routing: first along the row to the destination column, then
along the column. Multi-wafer meshes route XY on the source wafer to the destination's (row, col),
then up and down through that position's wafer switch. Switch platforms route GPU -> switch -> GPU
(NVLink inside a node, NIC links through the scale-out switch across nodes).

A die whose preset limits what it can put on the network (``die.injection_bandwidth_gb_per_s``)
gets two more links, its injection and ejection ports (kinds "inject", "eject", zero latency),
on every route that starts or ends at it, so every time model costs them like any other link.
Without the field a die injects what its links sum to; such a port carries exactly the bytes of
its links and can never be the bottleneck, so it is not built (and hops count network links only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
import scipy.sparse as sp

from meshserve.wafer.hardware import Hardware

PORT_KINDS = ("inject", "eject")


def runs(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For consecutive runs of the given lengths: (run index, step within the run) per element."""
    lengths = np.asarray(lengths, dtype=np.int64)
    run = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return run, np.arange(int(lengths.sum())) - starts[run]


@dataclass(frozen=True, eq=False)
class Topology:
    """Directed links and routes of one platform. Devices are nodes 0..N-1; switches come after."""

    name: str
    num_devices: int
    link_src: np.ndarray  # [L] node id
    link_dst: np.ndarray  # [L] node id
    link_bandwidth: np.ndarray  # [L] bytes/s
    link_latency: np.ndarray  # [L] seconds
    link_kind: np.ndarray  # [L] str: mesh, wafer-up/-down, nvlink-up/-down, nic-up/-down, inject, eject
    coords: np.ndarray  # [N, 2] (row, col) for drawing; mesh: global die position
    incidence: sp.csr_matrix  # [N*N, L]
    mesh_shape: tuple[int, int] | None = None  # (rows, cols) of one wafer, None for switches
    wafers: int = 1
    incidence_t: sp.csr_matrix = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "incidence_t", self.incidence.T.tocsr())

    @property
    def num_links(self) -> int:
        return len(self.link_src)

    @cached_property
    def hops(self) -> np.ndarray:
        """[N, N] number of network links on the route from src to dst (the device distance matrix)."""
        n = self.num_devices
        network = ~np.isin(self.link_kind, PORT_KINDS)
        return np.rint(self.incidence @ network.astype(np.float64)).astype(np.int64).reshape(n, n)

    @cached_property
    def path_latency(self) -> np.ndarray:
        """[N, N] seconds: sum of link latencies along each route."""
        n = self.num_devices
        return (self.incidence @ self.link_latency).reshape(n, n)

    def link_loads(self, traffic: np.ndarray) -> np.ndarray:
        """Bytes crossing each link for a traffic matrix T[src, dst] of bytes."""
        return self.incidence_t @ np.asarray(traffic, dtype=np.float64).ravel()

    def link_name(self, link: int) -> str:
        """Readable name, e.g. 'w0 (3,4)->(3,5)' on a mesh, 'gpu7->nvswitch0' on a switch."""

        def node(i: int) -> str:
            if i >= self.num_devices:
                return f"switch{i - self.num_devices}"
            if self.mesh_shape is None:
                return f"gpu{i}"
            per = self.mesh_shape[0] * self.mesh_shape[1]
            r, c = divmod(i % per, self.mesh_shape[1])
            return f"w{i // per}({r},{c})" if self.wafers > 1 else f"({r},{c})"

        if self.link_kind[link] in PORT_KINDS:
            return f"{node(int(self.link_src[link]))} {self.link_kind[link]}"
        return f"{node(int(self.link_src[link]))}->{node(int(self.link_dst[link]))}"


def _mesh_links(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Directed neighbour links of one rows x cols mesh and [rows, cols] tables of link ids by direction."""
    ids = np.arange(rows * cols).reshape(rows, cols)
    pairs = {
        "east": (ids[:, :-1], ids[:, 1:]),
        "west": (ids[:, 1:], ids[:, :-1]),
        "south": (ids[:-1, :], ids[1:, :]),
        "north": (ids[1:, :], ids[:-1, :]),
    }
    src, dst, tables, base = [], [], {}, 0
    for direction, (a, b) in pairs.items():
        table = np.full((rows, cols), -1, dtype=np.int64)
        # index each link by its source die, so route lookups index the table at the hop's start
        table.flat[a.ravel()] = base + np.arange(a.size)
        tables[direction] = table
        src.append(a.ravel())
        dst.append(b.ravel())
        base += a.size
    return np.concatenate(src), np.concatenate(dst), tables


def xy_routes(rows: int, cols: int, tables: dict[str, np.ndarray], src: np.ndarray, dst: np.ndarray):
    """XY routes for pairs of local die ids: (pair index, link id) for every hop, vectorised."""
    sr, sc = np.divmod(src, cols)
    dr, dc = np.divmod(dst, cols)
    run, step = runs(np.abs(dc - sc))
    east = (dc > sc)[run]
    col = np.where(east, sc[run] + step, sc[run] - step)
    x_links = np.where(east, tables["east"][sr[run], col], tables["west"][sr[run], col])
    run_y, step_y = runs(np.abs(dr - sr))
    south = (dr > sr)[run_y]
    row = np.where(south, sr[run_y] + step_y, sr[run_y] - step_y)
    y_links = np.where(south, tables["south"][row, dc[run_y]], tables["north"][row, dc[run_y]])
    return np.concatenate([run, run_y]), np.concatenate([x_links, y_links])


def _mesh_topology(hw: Hardware) -> Topology:
    rows, cols, wafers = hw.rows, hw.cols, hw.wafers
    per = rows * cols
    n = per * wafers
    m_src, m_dst, tables = _mesh_links(rows, cols)
    lm = len(m_src)
    offsets = np.repeat(np.arange(wafers) * per, lm)
    link_src = [np.tile(m_src, wafers) + offsets]
    link_dst = [np.tile(m_dst, wafers) + offsets]
    bandwidth = [np.full(lm * wafers, hw.link_bandwidth)]
    latency = [np.full(lm * wafers, hw.hop_latency)]
    kind = [np.full(lm * wafers, "mesh")]
    s, d = np.divmod(np.arange(n * n), n)
    ws, ls = np.divmod(s, per)
    wd, ld = np.divmod(d, per)
    pair, link = xy_routes(rows, cols, tables, ls, ld)
    link = link + ws[pair] * lm
    if wafers > 1:
        # off-wafer ports: die -> position switch (N + local id) and back
        dev = np.arange(n)
        switch = n + dev % per
        link_src += [dev, switch]
        link_dst += [switch, dev]
        bandwidth.append(np.full(2 * n, hw.wafer_link_bandwidth))
        latency.append(np.full(2 * n, hw.wafer_link_latency))
        kind += [np.full(n, "wafer-up"), np.full(n, "wafer-down")]
        cross = np.flatnonzero(ws != wd)
        up = wafers * lm + ws[cross] * per + ld[cross]
        down = wafers * lm + n + d[cross]
        pair = np.concatenate([pair, cross, cross])
        link = np.concatenate([link, up, down])
    # drawing position: wafers on a near-square grid with a one-die gap between them
    r, c = np.divmod(np.arange(n) % per, cols)
    wr, wc = np.divmod(np.arange(n) // per, int(np.ceil(np.sqrt(wafers))))
    coords = np.stack([r + wr * (rows + 1), c + wc * (cols + 1)], axis=1)
    pair, link = _add_ports(hw, n, link_src, link_dst, bandwidth, latency, kind, pair, link)
    return _build(
        hw.name,
        n,
        link_src,
        link_dst,
        bandwidth,
        latency,
        kind,
        coords,
        pair,
        link,
        mesh_shape=(rows, cols),
        wafers=wafers,
    )


def _switch_topology(hw: Hardware) -> Topology:
    n, per = hw.devices, hw.devices_per_node
    nodes = n // per
    dev = np.arange(n)
    node_switch = n + dev // per
    link_src, link_dst = [dev, node_switch], [node_switch, dev]
    bandwidth = [np.full(2 * n, hw.link_bandwidth)]
    latency = [np.full(2 * n, hw.hop_latency)]
    kind = [np.full(n, "nvlink-up"), np.full(n, "nvlink-down")]
    s, d = np.divmod(np.arange(n * n), n)
    keep = s != d
    same = keep & (s // per == d // per)
    cross = keep & ~same
    pair = np.concatenate([np.flatnonzero(same)] * 2)
    link = np.concatenate([s[same], n + d[same]])
    if nodes > 1:
        scale_out = np.full(n, n + nodes)
        link_src += [dev, scale_out]
        link_dst += [scale_out, dev]
        bandwidth.append(np.full(2 * n, hw.scale_out_bandwidth))
        latency.append(np.full(2 * n, hw.scale_out_latency))
        kind += [np.full(n, "nic-up"), np.full(n, "nic-down")]
        pair = np.concatenate([pair, np.flatnonzero(cross), np.flatnonzero(cross)])
        link = np.concatenate([link, 2 * n + s[cross], 3 * n + d[cross]])
    coords = np.stack(np.divmod(dev, per), axis=1)
    pair, link = _add_ports(hw, n, link_src, link_dst, bandwidth, latency, kind, pair, link)
    return _build(hw.name, n, link_src, link_dst, bandwidth, latency, kind, coords, pair, link)


def _add_ports(hw: Hardware, n, link_src, link_dst, bandwidth, latency, kind, pair, link):
    """Append each die's injection and ejection port (when its preset limits them) to every route."""
    if not hw.die.injection_bandwidth:
        return pair, link
    base = sum(len(x) for x in link_src)
    dev = np.arange(n)
    link_src += [dev, dev]
    link_dst += [dev, dev]
    bandwidth.append(np.full(2 * n, hw.die.injection_bandwidth))
    latency.append(np.zeros(2 * n))
    kind += [np.full(n, "inject"), np.full(n, "eject")]
    s, d = np.divmod(np.arange(n * n), n)
    routed = np.flatnonzero(s != d)
    return (
        np.concatenate([pair, routed, routed]),
        np.concatenate([link, base + s[routed], base + n + d[routed]]),
    )


def _build(name, n, link_src, link_dst, bandwidth, latency, kind, coords, pair, link, **extra) -> Topology:
    num_links = sum(len(x) for x in link_src)
    order = np.lexsort((link, pair))  # CSR rows hold their links in route-independent id order
    incidence = sp.csr_matrix((np.ones(len(pair)), (pair[order], link[order])), shape=(n * n, num_links))
    return Topology(
        name=name,
        num_devices=n,
        link_src=np.concatenate(link_src),
        link_dst=np.concatenate(link_dst),
        link_bandwidth=np.concatenate(bandwidth).astype(np.float64),
        link_latency=np.concatenate(latency).astype(np.float64),
        link_kind=np.concatenate(kind),
        coords=coords,
        incidence=incidence,
        **extra,
    )


@lru_cache(maxsize=32)
def topology_for(hw: Hardware) -> Topology:
    """The (cached) topology of a platform: built once per distinct Hardware."""
    return _mesh_topology(hw) if hw.kind == "mesh" else _switch_topology(hw)
