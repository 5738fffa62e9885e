"""NI-Balancer's migration stream: copies advance in whole chunks through idle link time.

Each iteration, every active step (the current leg of each unfinished copy) gets the chunks its
links can spare in the phase windows of that iteration: the attention all-reduce of every layer
for local steps, the dispatch and combine of every layer for global steps (see balance/ni.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from meshserve.placement import Placement
from meshserve.wafer.balance.steps import LOCAL, MigrationSteps
from meshserve.wafer.comm_model import CommModel


def window_bytes(
    routes: sparse.csr_matrix, rows: np.ndarray, slack: np.ndarray, chunk_bytes: int
) -> np.ndarray:
    """Bytes each migration step may send inside phase windows without slowing the phase.

    rows: route rows (src * N + dst) of the active steps, oldest first; slack: [..., links] bytes
    each link can still carry in each window (phase time x bandwidth - phase bytes). A link fits
    floor(slack / chunk) whole chunks per window; it deals them out evenly to the steps that
    cross it, the leftover ones to the oldest steps, and a step sends the fewest chunks any of
    its links allows. Returns [..., steps] bytes per window.
    """
    slack = np.asarray(slack, dtype=np.float64)
    if len(rows) == 0:
        return np.zeros((*slack.shape[:-1], 0))
    paths = routes[rows]
    links = paths.indices
    step = np.repeat(np.arange(len(rows)), np.diff(paths.indptr))
    chunks = np.floor(np.maximum(slack, 0.0) / chunk_bytes).astype(np.int64)
    sharing = np.bincount(links, minlength=slack.shape[-1])
    order = np.lexsort((step, links))  # entries grouped by link, oldest step first
    first = np.searchsorted(links[order], links[order])
    rank = np.empty(len(links), dtype=np.int64)
    rank[order] = np.arange(len(links)) - first
    share, extra = np.divmod(chunks[..., links], sharing[links])
    allowed = share + (rank < extra)
    return np.minimum.reduceat(allowed, paths.indptr[:-1], axis=-1) * float(chunk_bytes)


@dataclass
class Flight:
    """A non-invasive migration under way: its steps, bytes left per step, its origin and target.

    A layer switches to ``target`` once all its copies have landed (each layer's table is swapped
    whole, as an engine rearranges layer by layer, so no expert is ever without a replica).
    """

    origin: Placement
    target: Placement
    steps: MigrationSteps
    layer: np.ndarray  # layer of each copy
    left: np.ndarray  # bytes left per step
    start: np.ndarray  # first step index of each copy
    count: np.ndarray  # steps per copy
    done: np.ndarray  # steps finished per copy

    @classmethod
    def begin(
        cls, origin: Placement, target: Placement, steps: MigrationSteps, layer: np.ndarray, nbytes: float
    ) -> Flight:
        """Every copy (of layer ``layer[copy]``) of ``nbytes`` starts at its first step."""
        count = np.bincount(steps.copy, minlength=len(layer))
        start = np.concatenate([[0], np.cumsum(count)[:-1]])
        left = np.full(len(steps), float(nbytes))
        done = np.zeros(len(layer), dtype=np.int64)
        return cls(origin, target, steps, np.asarray(layer), left, start, count, done)

    def landed_layers(self) -> np.ndarray:
        """[layers] True where every copy of the layer has landed (or it needs none)."""
        waiting = np.bincount(self.layer[self.done < self.count], minlength=self.target.num_layers)
        return waiting == 0

    def placement(self) -> Placement:
        """The table in use now: ``target`` in the landed layers, ``origin`` elsewhere."""
        holds = np.where(self.landed_layers()[:, None, None], self.target.holds, self.origin.holds)
        return Placement(holds, self.target.slots_per_device)

    def active(self) -> np.ndarray:
        """Index of the current step of every unfinished copy."""
        live = self.done < self.count
        return (self.start + self.done)[live]

    def advance(
        self, comm: CommModel, a2a: list[tuple[np.ndarray, np.ndarray, np.ndarray]], chunk_bytes: int
    ) -> tuple[bool, float, np.ndarray]:
        """Send one iteration's chunks; returns (every copy landed, highest link utilisation,
        [devices] HBM bytes read + written by the chunks sent).

        a2a: the iteration's all-to-all phases, each (link bytes [layers, k], phase time [layers],
        the k link ids): the windows of the global steps. A window is filled only up to
        ``comm.migration_ceiling`` of its time x bandwidth (links saturate below 1.0). A step's
        chunks are read from its source die's HBM and written to its destination's (a relay
        stores a whole copy before its next step starts).
        """
        idx = self.active()
        rows = self.steps.src[idx] * comm.num_devices + self.steps.dst[idx]
        local = self.steps.phase[idx] == LOCAL
        layers = a2a[0][1].shape[0]
        sent = np.zeros(len(idx))
        ceiling = comm.migration_ceiling
        # Local steps: the attention all-reduce window of every layer (same traffic in each layer).
        capacity = comm.allreduce_time * comm.bandwidth
        per = window_bytes(comm.routes, rows[local], capacity * ceiling - comm.allreduce_bytes, chunk_bytes)
        sent[local] = per * layers
        worst = utilisation(comm, rows[local], per, comm.allreduce_bytes, capacity)
        # Global steps: each all-to-all phase's window in every layer.
        for link_bytes, phase_s, links in a2a:
            phase_bytes = np.zeros((layers, len(comm.bandwidth)))
            phase_bytes[:, links] = link_bytes
            capacity = phase_s[:, None] * comm.bandwidth[None, :]
            slack = capacity * ceiling - phase_bytes
            per = window_bytes(comm.routes, rows[~local], slack, chunk_bytes)  # [L, steps]
            sent[~local] += per.sum(axis=0)
            worst = max(worst, utilisation(comm, rows[~local], per, phase_bytes, capacity))
        sent = np.minimum(sent, np.maximum(self.left[idx], 0.0))  # a step sends no more than is left
        hbm = np.bincount(self.steps.src[idx], sent, comm.num_devices)
        hbm += np.bincount(self.steps.dst[idx], sent, comm.num_devices)
        self.left[idx] -= sent
        finished = idx[self.left[idx] <= 0]
        self.done[self.steps.copy[finished]] += 1
        return bool((self.done >= self.count).all()), worst, hbm


def utilisation(
    comm: CommModel, rows: np.ndarray, per: np.ndarray, base: np.ndarray, cap: np.ndarray
) -> float:
    """Highest (phase bytes + migration bytes) / (phase time x bandwidth) on links migration uses.

    base, cap: [links] or [layers, links] (every layer's window is checked)."""
    if len(rows) == 0 or not per.any():
        return 0.0
    extra = np.asarray(comm.routes[rows].T @ np.atleast_2d(per).T).T  # [layers or 1, links]
    used = (extra > 0).any(axis=0)
    return float(((base[..., used] + extra[..., used]) / cap[..., used]).max())
