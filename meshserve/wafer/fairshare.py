"""Max-min fair-share flow model: a slower, less optimistic alternative to the bottleneck model.

Every (src, dst) pair with bytes is one flow on its route; all flows start together. Rates are the
max-min fair allocation (progressive filling: raise all rates together, freeze the flows of each
link that fills up); when a flow finishes, its bandwidth is shared again. The collective ends when
the last flow does. Unlike the bottleneck model, a link shared by flows that are slowed down
elsewhere is not assumed busy all the time. Router pipelines, packetisation and virtual channels
are still not modelled (see docs/wafer.md for its error against the cycle-level figures).

Many problems over the same flows (the iteration simulator's all-to-alls, one per iteration and
layer) drain side by side: arrays are [flows, problems], one sparse product per filling round.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from meshserve.wafer.topology import Topology


def max_min_rates(
    flows: sp.csr_matrix, links: sp.csr_matrix, capacity: np.ndarray, active: np.ndarray
) -> np.ndarray:
    """Max-min fair rates (bytes/s) [F, B] of the active flows [F, B] of B problems.

    flows [F, L] 0/1 routes and links = flows.T, both CSR; capacity [L] bytes/s.
    """
    rate = np.zeros(active.shape)
    frozen = ~active
    left = np.repeat(capacity.astype(np.float64)[:, None], active.shape[1], axis=1)
    while True:
        open_ = np.flatnonzero(~frozen.all(axis=0))  # problems with a flow still to fix
        if not len(open_):
            return rate
        count = links @ (~frozen[:, open_]).astype(np.float64)  # unfrozen flows on each link
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(count > 0, left[:, open_] / count, np.inf)
        level = share.min(axis=0)
        tight = share <= level * (1 + 1e-9)
        hit = ((flows @ tight.astype(np.float64)) > 0) & ~frozen[:, open_]
        rate[:, open_] = np.where(hit, level, rate[:, open_])
        frozen[:, open_] |= hit
        left[:, open_] = np.maximum(left[:, open_] - links @ np.where(hit, level, 0.0), 0.0)


def drain(flows: sp.csr_matrix, remaining: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Seconds [B] until flows [F, links] with ``remaining`` bytes [F, B] finish, re-sharing whenever
    one does (a flow of zero bytes is done from the start)."""
    links = flows.T.tocsr()
    remaining = np.array(remaining, dtype=np.float64, ndmin=2)
    elapsed = np.zeros(remaining.shape[1])
    active = remaining > 0
    live = np.flatnonzero(active.any(axis=0))
    while len(live):
        rem, act = remaining[:, live], active[:, live]
        rate = max_min_rates(flows, links, capacity, act)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(act, rem / rate, np.inf).min(axis=0)
        elapsed[live] += step
        rem = np.where(act, rem - rate * step, rem)
        remaining[:, live] = rem
        active[:, live] = act & (rem > 1e-9 * rem.max(axis=0, initial=1.0) + 1e-6)
        live = live[active[:, live].any(axis=0)]
    return elapsed


def fair_share_seconds(routes: sp.csr_matrix, bandwidth: np.ndarray, traffic: np.ndarray) -> float:
    """Seconds until every flow of the traffic matrix has finished under max-min fair sharing.

    routes: [N * N, links] 0/1 (row src * N + dst). Flows that share no link, directly or through
    other flows, never change each other's rates, so each connected group (e.g. one wafer's
    all-to-all under hierarchical ER) is drained as its own problem, all side by side, and the
    collective ends with the slowest group: the same answer, on smaller systems.
    """
    n = traffic.shape[0]
    src, dst = np.nonzero(np.asarray(traffic) > 0)
    keep = src != dst
    src, dst = src[keep], dst[keep]
    if not len(src):
        return 0.0
    remaining = np.asarray(traffic, dtype=np.float64)[src, dst]
    flows = routes[src * n + dst].tocsr()
    # a graph of flows and links, an edge where a flow uses a link
    graph = sp.bmat([[None, flows], [flows.T, None]]).tocsr()
    _, group = connected_components(graph, directed=False)
    _, group = np.unique(group[: len(src)], return_inverse=True)
    sizes = np.zeros((len(src), group.max() + 1))
    sizes[np.arange(len(src)), group] = remaining  # problem g: group g's flows, the others empty
    return float(drain(flows, sizes, bandwidth).max())


def fair_share_time(topo: Topology, traffic: np.ndarray) -> float:
    """fair_share_seconds on a topology's routes and link bandwidths."""
    return fair_share_seconds(topo.incidence, topo.link_bandwidth, traffic)


def crowding(flows: sp.csr_matrix, capacity: np.ndarray) -> np.ndarray:
    """[F] the most flows per byte/s on any link of each flow's route (all flows counted)."""
    per_link = np.asarray(flows.sum(axis=0)).ravel() / capacity
    on_route = per_link[flows.indices]  # the flows' links in CSR order
    return np.maximum.reduceat(on_route, flows.indptr[:-1]) if flows.nnz else np.zeros(0)


def certified_bottleneck(sizes: np.ndarray, crowd: np.ndarray, bottleneck: np.ndarray) -> np.ndarray:
    """[B] True where fair sharing provably ends at the bottleneck time (sizes [F, B], crowd [F]).

    Why: in a max-min fair allocation every flow has a saturated link on which no flow is faster,
    so its rate is at least that link's capacity over its active flows: at least 1 / crowd at all
    times (flows only ever leave). Every flow is thus done by size x crowd, and no schedule beats
    the hottest link's bytes / bandwidth; where the first bound is at most the second, both are
    the fair-share time. (tests/wafer/test_fairshare.py checks it against the drain.)
    """
    return (sizes * crowd[:, None]).max(axis=0, initial=0.0) <= bottleneck * (1 + 1e-12)
