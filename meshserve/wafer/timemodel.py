"""Time of a collective on a topology.

bottleneck (fast path): time = max over links of bytes / bandwidth + steps x the slowest used
  route's latency (sum of its links' latencies). Optimistic under contention: it assumes the
  hottest link is busy all the time and every other flow hides behind it.
fair-share: see fairshare.py (max-min fair progressive filling of flows on links).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshserve.errors import InputError
from meshserve.wafer.topology import Topology
from meshserve.wafer.traffic import Collective

TIME_MODELS = ("bottleneck", "fair-share")


@dataclass(frozen=True, eq=False)
class PhaseTime:
    """Result of one phase: its time split, hottest link and the per-link loads behind it."""

    name: str
    time_s: float
    bandwidth_s: float
    latency_s: float
    hottest_link: int  # -1 when no byte crosses a link
    hottest_bytes: float
    loads: np.ndarray  # [L] bytes per link
    model: str


def bottleneck_s(link_bytes: np.ndarray, bandwidth: np.ndarray) -> np.ndarray:
    """Bottleneck bandwidth time of link bytes [..., links]: the hottest link's bytes / bandwidth.

    The one bottleneck rule shared by the layer simulator (collective_time), the iteration
    simulator's all-to-all (comm_model.LinkMap) and its migration stalls (CommModel.transfer_time).
    """
    return (np.asarray(link_bytes) / bandwidth).max(axis=-1, initial=0.0)


def latency_s(topo: Topology, c: Collective) -> float:
    """steps x latency of the slowest route that carries bytes."""
    used = c.traffic > 0
    return c.steps * float(topo.path_latency[used].max()) if used.any() else 0.0


def collective_time(topo: Topology, c: Collective, model: str = "bottleneck") -> PhaseTime:
    """Time of one collective on the topology under the chosen time model."""
    if model not in TIME_MODELS:
        raise InputError("time_model", f"unknown {model!r}; allowed: {', '.join(TIME_MODELS)}")
    loads = topo.link_loads(c.traffic)
    busy = loads / topo.link_bandwidth
    hot = int(np.argmax(busy)) if loads.any() else -1
    if model == "bottleneck":
        bandwidth = float(bottleneck_s(loads, topo.link_bandwidth))
    else:
        from meshserve.wafer.fairshare import fair_share_time

        bandwidth = fair_share_time(topo, c.traffic)
    lat = latency_s(topo, c)
    return PhaseTime(
        c.name, bandwidth + lat, bandwidth, lat, hot, float(loads[hot]) if hot >= 0 else 0.0, loads, model
    )
