"""What a platform, a mapping and a model contribute to the iteration-level simulation.

:class:`CommModel`: routes, all-to-all domains, all-to-all link maps and the attention
all-reduce of one layout (built over the simulator core by
:func:`meshserve.wafer.balance_setup.comm_model`); the expert roofline is compute.ExpertCost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from meshserve.wafer.compute import ExpertCost
from meshserve.wafer.fair_a2a import FairPhase
from meshserve.wafer.fairshare import fair_share_seconds
from meshserve.wafer.timemodel import bottleneck_s

__all__ = ["CommModel", "ExpertCost", "LinkMap"]


@dataclass(frozen=True, eq=False)
class LinkMap:
    """A linear map device loads [rows, devices] -> link bytes [rows, len(links)], in dense blocks.

    links: global ids of the output columns. When the all-to-all domains use disjoint links (ER,
    hierarchical ER) each domain is one block writing its own column range, so the zeros of the
    full [devices, links] matrix are skipped; otherwise one dense block covers everything.
    """

    links: np.ndarray
    blocks: tuple[tuple[np.ndarray, int, int, np.ndarray], ...]  # (devices, start, stop, [D, L])
    bandwidth: np.ndarray  # [len(links)] float32 bytes/s

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, domains: np.ndarray, bandwidth: np.ndarray) -> LinkMap:
        """Split a [devices, all links] matrix by the devices' domains."""
        groups = [np.flatnonzero(domains == d) for d in np.unique(domains)]
        cols = [np.flatnonzero((matrix[dev] != 0).any(axis=0)) for dev in groups]
        if sum(len(c) for c in cols) != len(np.unique(np.concatenate(cols))):  # shared links
            groups, cols = [np.arange(matrix.shape[0])], [np.flatnonzero((matrix != 0).any(axis=0))]
        blocks, start = [], 0
        for dev, c in zip(groups, cols, strict=True):
            block = np.ascontiguousarray(matrix[np.ix_(dev, c)], dtype=np.float32)
            blocks.append((dev, start, start + len(c), block))
            start += len(c)
        links = np.concatenate(cols)
        return cls(links, tuple(blocks), bandwidth[links].astype(np.float32))

    def __call__(self, load: np.ndarray) -> np.ndarray:
        out = np.empty((load.shape[0], len(self.links)), dtype=np.float32)
        for dev, start, stop, block in self.blocks:
            np.matmul(load[:, dev], block, out=out[:, start:stop])
        return out

    def time(self, link_bytes: np.ndarray, latency: float) -> np.ndarray:
        """Bottleneck time of link bytes [..., len(links)] -> [...]."""
        return bottleneck_s(link_bytes, self.bandwidth) + latency


@dataclass(frozen=True)
class CommModel:
    """A platform + mapping as the iteration simulator needs it.

    hops: [devices, devices] route lengths; path_latency: [devices, devices] seconds per route.
    ftd: [devices] all-to-all domain (FTD, or wafer under hierarchical ER); migration steps
      split at its borders.
    routes: sparse [devices * devices, links] 0/1: links on the route src -> dst (row src*N+dst).
    bandwidth: [links] bytes/s.
    dispatch, combine: maps device loads [rows, devices] -> all-to-all link bytes on the links the
      all-to-all can load (link bytes per routed token slot a device serves; combine: the way back).
    a2a_latency: latency of the longest all-to-all route (seconds).
    allreduce_bytes: [links] link bytes of one attention all-reduce; allreduce_time: its time.
    count_exchange_time: seconds of an all-gather of every device's per-expert token counts
      (int32) inside its all-to-all domain: what a balanced dispatch waits for before the
      dispatch of each layer that has a replicated expert (placement.dispatch).
    time_model: how the all-to-all, the all-reduce and migration stalls are timed (timemodel.py);
      fair: the all-to-all's (dispatch, combine) flows under ``fair-share``, None under bottleneck.
    return_time: seconds per layer of the MoE output's return to every TP member after the
      combine (traffic.output_return; 0 with the ``output_return`` cost off).
    migration_ceiling: the highest utilisation streamed migration may fill a link to.
    migration_hbm: charge expert copies' HBM reads and writes (costs.py).
    """

    hops: np.ndarray
    ftd: np.ndarray
    routes: sparse.csr_matrix
    bandwidth: np.ndarray
    path_latency: np.ndarray
    dispatch: LinkMap
    combine: LinkMap
    a2a_latency: float
    allreduce_bytes: np.ndarray
    allreduce_time: float
    count_exchange_time: float = 0.0
    time_model: str = "bottleneck"
    fair: tuple[FairPhase, FairPhase] | None = None
    return_time: float = 0.0
    migration_ceiling: float = 1.0
    migration_hbm: bool = False

    @property
    def num_devices(self) -> int:
        return int(self.hops.shape[0])

    def a2a_seconds_per_token(self) -> tuple[np.ndarray, np.ndarray]:
        """Dispatch and combine as [devices, all links] link seconds per routed token a device serves.

        The planners' all-to-all (placement.DeviceCost.a2a_phases): linear in the device loads, as
        here; latency is left out (the same for every placement).
        """
        out = []
        for phase in (self.dispatch, self.combine):
            dense = np.zeros((self.num_devices, len(self.bandwidth)), dtype=np.float32)
            for dev, start, stop, block in phase.blocks:
                dense[np.ix_(dev, phase.links[start:stop])] = block / phase.bandwidth[start:stop]
            out.append(dense[:, np.flatnonzero(dense.any(axis=0))])
        return out[0], out[1]

    def a2a_times(
        self, load: np.ndarray, dispatch_bytes: np.ndarray, combine_bytes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Dispatch and combine seconds [rows] of device loads [rows, devices] and their link bytes."""
        if self.fair is None:
            return (
                self.dispatch.time(dispatch_bytes, self.a2a_latency),
                self.combine.time(combine_bytes, self.a2a_latency),
            )
        return self.fair[0].time(load, self.a2a_latency), self.fair[1].time(load, self.a2a_latency)

    def transfer_time(self, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray) -> float:
        """Time for point-to-point copies all at once (hottest link's bytes / bandwidth, or fair
        sharing of the copies' flows) + latency."""
        if len(src) == 0:
            return 0.0
        nbytes = np.asarray(nbytes, dtype=np.float64)
        latency = self.path_latency[src, dst].max()
        if self.time_model == "fair-share":
            traffic = np.zeros((self.num_devices, self.num_devices))
            np.add.at(traffic, (src, dst), nbytes)
            return float(fair_share_seconds(self.routes, self.bandwidth, traffic) + latency)
        link_bytes = self.routes[src * self.num_devices + dst].T @ nbytes
        return float(bottleneck_s(link_bytes, self.bandwidth) + latency)
