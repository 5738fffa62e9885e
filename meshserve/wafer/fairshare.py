"""Max-min fair-share flow model: a slower, less optimistic alternative to the bottleneck model.

Every (src, dst) pair with bytes is one flow on its route; all flows start together. Rates are the
max-min fair allocation (progressive filling: raise all rates together, freeze the flows of each
link that fills up); when a flow finishes, its bandwidth is shared again. The collective ends when
the last flow does. Unlike the bottleneck model, a link shared by flows that are slowed down
elsewhere is not assumed busy all the time. Router pipelines, packetisation and virtual channels
are still not modelled (see docs/wafer.md for its error against the cycle-level figures).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from meshserve.wafer.topology import Topology


def max_min_rates(flows: sp.csr_matrix, links: sp.csr_matrix, capacity: np.ndarray,
                  active: np.ndarray) -> np.ndarray:
    """Max-min fair rates (bytes/s) of the active flows; flows [F, L] and links = flows.T as CSR."""
    rate = np.zeros(flows.shape[0])
    frozen = ~active
    left = capacity.astype(np.float64).copy()
    while not frozen.all():
        count = links @ (~frozen).astype(np.float64)  # unfrozen flows on each link
        used = count > 0
        share = np.full(len(left), np.inf)
        share[used] = left[used] / count[used]
        level = share.min()
        tight = share <= level * (1 + 1e-9)
        hit = ((flows @ tight.astype(np.float64)) > 0) & ~frozen
        rate[hit] = level
        frozen |= hit
        left = np.maximum(left - links @ np.where(hit, level, 0.0), 0.0)
    return rate


def fair_share_time(topo: Topology, traffic: np.ndarray) -> float:
    """Seconds until every flow of the traffic matrix has finished under max-min fair sharing.

    Flows that share no link, directly or through other flows, never change each other's rates, so
    each connected group (e.g. one wafer's all-to-all under hierarchical ER) is drained on its own
    and the collective ends with the slowest group: the same answer, on smaller systems.
    """
    n = topo.num_devices
    src, dst = np.nonzero(np.asarray(traffic) > 0)
    keep = src != dst
    src, dst = src[keep], dst[keep]
    if not len(src):
        return 0.0
    remaining = np.asarray(traffic, dtype=np.float64)[src, dst]
    flows = topo.incidence[src * n + dst].tocsr()
    # a graph of flows and links, an edge where a flow uses a link
    graph = sp.bmat([[None, flows], [flows.T, None]]).tocsr()
    _, group = connected_components(graph, directed=False)
    group = group[: len(src)]
    return max(drain(flows[group == g], remaining[group == g], topo.link_bandwidth) for g in np.unique(group))


def drain(flows: sp.csr_matrix, remaining: np.ndarray, capacity: np.ndarray) -> float:
    """Seconds until flows [F, links] with ``remaining`` bytes finish, re-sharing whenever one does."""
    links = flows.T.tocsr()
    remaining = remaining.copy()
    active = np.ones(len(remaining), dtype=bool)
    elapsed = 0.0
    while active.any():
        rate = max_min_rates(flows, links, capacity, active)
        step = (remaining[active] / rate[active]).min()
        elapsed += step
        remaining[active] -= rate[active] * step
        active &= remaining > 1e-9 * remaining.max(initial=1.0) + 1e-6
    return float(elapsed)
