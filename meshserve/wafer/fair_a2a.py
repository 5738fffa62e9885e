"""The iteration simulator's all-to-all under the fair-share time model.

A phase's flows never change, only their bytes: a flow carries ``bytes_per_slot`` x the load of
its expert's device (the destination of a dispatch, the source of a combine). Domains that share
no link are drained apart. Per iteration and layer the phase ends at its hottest link's time
wherever fairshare.certified_bottleneck proves that no domain outlasts it; the other domains are
drained exactly, side by side (fairshare.drain), each distinct load of a domain once (a planner
re-scores the same history).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from meshserve.wafer.fairshare import certified_bottleneck, crowding, drain


@dataclass(frozen=True, eq=False)
class FlowGroup:
    """The flows of one all-to-all domain on the links they use."""

    flows: sp.csr_matrix  # [F, links of the group] 0/1 routes
    expert_device: np.ndarray  # [F] the device whose load sets the flow's bytes
    bytes_per_slot: np.ndarray  # [F]
    bandwidth: np.ndarray  # [links of the group] bytes/s
    crowd: np.ndarray = field(init=False)  # [F] fairshare.crowding
    devices: np.ndarray = field(init=False)  # the group's expert devices: the key of a load
    solved: dict[bytes, float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "crowd", crowding(self.flows, self.bandwidth))
        object.__setattr__(self, "devices", np.unique(self.expert_device))

    def sizes(self, load: np.ndarray) -> np.ndarray:
        """Bytes [F, rows] of each flow for device loads [rows, devices]."""
        return (load[:, self.expert_device] * self.bytes_per_slot).T

    def bottleneck(self, sizes: np.ndarray) -> np.ndarray:
        """[rows] the hottest link's bytes / bandwidth."""
        return ((self.flows.T @ sizes) / self.bandwidth[:, None]).max(axis=0, initial=0.0)

    def drained(self, load: np.ndarray, sizes: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact fair-share seconds of ``rows``, each distinct load of the group solved once."""
        keys = [load[r, self.devices].tobytes() for r in rows]
        todo = {k: r for r, k in zip(rows, keys, strict=True) if k not in self.solved}
        if todo:
            new = np.fromiter(todo.values(), dtype=np.int64)
            self.solved.update(zip(todo, drain(self.flows, sizes[:, new], self.bandwidth), strict=True))
        return np.array([self.solved[k] for k in keys])


@dataclass(frozen=True, eq=False)
class FairPhase:
    """One phase (dispatch or combine) as flow groups; a row ends with its slowest domain."""

    groups: tuple[FlowGroup, ...]

    @classmethod
    def build(
        cls,
        routes: sp.csr_matrix,
        bandwidth: np.ndarray,
        unit: np.ndarray,
        slots: float,
        domains: np.ndarray,
        *,
        combine: bool,
    ) -> FairPhase:
        """From the all-to-all's unit traffic [src, dst] (one expert per device, ``slots`` per device).

        combine: the flows run back, expert device -> sender.
        """
        n = unit.shape[0]
        src, dst = np.nonzero(unit)
        keep = src != dst
        src, dst = src[keep], dst[keep]
        weight = unit[src, dst] / slots
        rows = dst * n + src if combine else src * n + dst
        routes = routes[rows].tocsr()
        parts = [np.flatnonzero(domains[dst] == d) for d in np.unique(domains[dst])]
        cols = [np.flatnonzero(routes[p].getnnz(axis=0)) for p in parts]
        if sum(map(len, cols)) != len(np.unique(np.concatenate(cols))):  # domains share links
            parts, cols = [np.arange(len(src))], [np.flatnonzero(routes.getnnz(axis=0))]
        return cls(
            tuple(
                FlowGroup(routes[p][:, c], dst[p], weight[p], bandwidth[c])
                for p, c in zip(parts, cols, strict=True)
            )
        )

    def bottleneck(self, load: np.ndarray, sizes: list[np.ndarray] | None = None) -> np.ndarray:
        """Seconds [rows] of the hottest link of all domains (``sizes``: each group's, if known)."""
        sizes = sizes or [g.sizes(load) for g in self.groups]
        return np.max([g.bottleneck(s) for g, s in zip(self.groups, sizes, strict=True)], axis=0)

    def time(self, load: np.ndarray, latency: float) -> np.ndarray:
        """Seconds [rows] of device loads [rows, devices]: the slowest domain + latency.

        A domain can only outlast the hottest link of all domains where its flows' bound
        (size x crowding) exceeds it (fairshare.certified_bottleneck); only those are drained.
        """
        sizes = [g.sizes(load) for g in self.groups]
        out = self.bottleneck(load, sizes)
        for g, s in zip(self.groups, sizes, strict=True):
            rows = np.flatnonzero(~certified_bottleneck(s, g.crowd, out))
            if len(rows):
                out[rows] = np.maximum(out[rows], g.drained(load, s, rows))
        return out + latency
