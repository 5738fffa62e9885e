"""Congestion-aware NoC time model: a vectorised packet-level simulation with finite VC buffers.

Mechanisms it keeps (the ones a flow model drops, docs/wafer.md "A NoC time model that knows its
error"):
- serialisation: a channel (link, injection or ejection port) carries one flit per cycle, so a
  packet of F flits holds it for F cycles;
- finite buffers: each channel feeds an input port of V virtual channels (VCs) at the next router;
  a packet may start on a channel only when a VC there is free (credit flow control);
- wormhole blocking: a VC holds ``vc_buffer_flits`` flits, so a packet's tail still sits in the
  VCs of the ceil(F / b) - 1 hops behind its head; a blocked head keeps all of them, blocking
  whoever waits for them (head-of-line blocking along the path);
- a router input port reads one flit per cycle (one packet at a time to the crossbar), allocation
  is separable (each input grants its oldest eligible packet, then each output its oldest request);
- injection: each node sends its batch in order through its injection port (FIFO: the queue's
  head blocks the rest), ejection takes one flit per cycle. The source is a packet's first hop
  "behind" it: while its head is blocked fewer than ceil(F / b) hops out, its tail is still in
  the source queue, and the next packet waits behind it (BookSim2's injection queue is a FIFO
  of flits; without this a source kept injecting past a blocked head).
What it leaves out: flit-by-flit interleaving of VCs on a link (a packet holds its channel for F
consecutive cycles), allocator iterations and speculation, and per-flit credit timing. The head
advances through a channel in that channel's latency (router pipeline + wire).

Time advances cycle by cycle over all channels at once (numpy); idle stretches are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NocParams:
    """Router and packet parameters (defaults: presets/noc.yaml)."""

    flits_per_packet: int
    vcs: int
    vc_buffer_flits: int
    hop_cycles: int  # head latency of a mesh link (router pipeline + wire)


def simulate_packets(
    route: np.ndarray,
    source: np.ndarray,
    latency: np.ndarray,
    is_eject: np.ndarray,
    params: NocParams,
    width: np.ndarray | None = None,
) -> int:
    """Cycles until the last packet has arrived.

    route[p]: channel ids packet p crosses in order, its injection port first and its ejection port
    last, padded with -1; a source injects its packets in id order. source[p]: its node.
    latency[c]: cycles the head needs through channel c (router pipeline + wire; at least 1 is
    spent anyway, since a packet is allocated once per cycle). is_eject[c]: channel c delivers
    into a node (no buffer behind it). width[c]: packets channel c carries at once (None: 1), as
    the flit model's one-flit lanes: a node with an injection channel of width n sends n packets
    at once, and the router input behind a wide channel passes n packets at a time.
    """
    F, V = params.flits_per_packet, params.vcs
    held = max(-(-F // params.vc_buffer_flits), 1)  # VCs a packet spans when its head is blocked
    num = len(route)
    if num == 0:
        return 0
    latency = np.asarray(latency, dtype=np.int64)
    num_channels = len(latency)
    width = np.ones(num_channels, np.int64) if width is None else np.maximum(np.asarray(width, np.int64), 1)
    nodes = int(source.max()) + 1
    lanes = np.zeros(nodes, dtype=np.int64)  # each source's injection width
    lanes[source] = width[route[:, 0]]
    port_width = np.concatenate([width, lanes])  # input ports (behind each channel), then sources
    start = np.full(route.shape, -1, dtype=np.int64)  # cycle each channel of the route was taken
    pos = np.full(num, -1, dtype=np.int64)  # index in route of the channel whose VC the packet holds
    ready = np.zeros(num, dtype=np.int64)  # cycle its head reaches the router at the end of that channel
    done = np.zeros(num, dtype=bool)
    # each source's queue in order: a packet may start injecting once all but lanes - 1 before it have
    order = np.lexsort((np.arange(num), source))
    queue_rank = np.empty(num, dtype=np.int64)
    first = np.searchsorted(source[order], source[order])
    queue_rank[order] = np.arange(num) - first
    queued = np.ones(num, dtype=bool)
    size = F + 2
    channel_busy = np.zeros(num_channels, dtype=np.int64)  # packets a channel is carrying
    port_busy = np.zeros(num_channels + nodes, dtype=np.int64)  # packets an input port / source is passing
    occupied = np.zeros(num_channels, dtype=np.int64)  # VCs in use behind each channel
    releases = np.zeros((size, num_channels), dtype=np.int64)  # VC frees, by cycle mod size
    channel_ends = np.zeros((size, num_channels), dtype=np.int64)  # tails leaving a channel, by cycle
    port_ends = np.zeros((size, num_channels + nodes), dtype=np.int64)
    next_in_queue = np.zeros(nodes, dtype=np.int64)
    t, finish = 0, 0
    while not done.all():
        slot = t % size
        for busy, ring in ((occupied, releases), (channel_busy, channel_ends), (port_busy, port_ends)):
            busy -= ring[slot]
            ring[slot] = 0
        inside = ~done & ~queued & (ready <= t)
        heads = queued & (queue_rank < next_in_queue[source] + lanes[source])
        cand = np.flatnonzero(inside | heads)
        nxt = route[cand, pos[cand] + 1]
        port = np.where(queued[cand], num_channels + source[cand], route[cand, np.maximum(pos[cand], 0)])
        ok = free_lanes(nxt, width, channel_busy, occupied, is_eject, V) > 0
        ok &= port_busy[port] < port_width[port]
        cand, nxt, port = cand[ok], nxt[ok], port[ok]
        if len(cand):
            # separable allocation, oldest packet first: grants per input port, then per output
            pick = np.lexsort((cand, port))
            pick = pick[rank_in_runs(port[pick]) < (port_width - port_busy)[port[pick]]]
            cand, nxt, port = cand[pick], nxt[pick], port[pick]
            win, nxt, port = _grant_outputs(cand, nxt, port, width, channel_busy, occupied, is_eject, V)
            injected = queued[win]
            np.add.at(channel_busy, nxt, 1)
            np.add.at(port_busy, port, 1)
            np.add.at(channel_ends[(t + F) % size], nxt, 1)
            np.add.at(port_ends[(t + F) % size], port[~injected], 1)  # a source frees with the tail
            np.add.at(occupied, nxt[~is_eject[nxt]], 1)
            np.add.at(next_in_queue, source[win[injected]], 1)
            queued[win] = False
            pos[win] += 1
            start[win, pos[win]] = t
            ready[win] = t + latency[nxt]
            rows, behind, when = _release(win, pos[win], start, route, is_eject[nxt], held, t, F)
            vc = behind >= 0
            np.add.at(releases, (when[vc] % size, route[rows[vc], behind[vc]]), 1)
            np.add.at(port_ends, (when[~vc] % size, num_channels + source[rows[~vc]]), 1)
            ejected = is_eject[nxt]
            done[win[ejected]] = True
            if ejected.any():  # the tail leaves the ejection port F cycles on, then crosses it
                finish = max(finish, t + F + int(latency[nxt[ejected]].max()))
            t += 1
            continue
        # nothing could move: jump to the next cycle where a head arrives or a ring frees something
        waiting = ready[~done & (ready > t)]
        pending = np.flatnonzero(releases.any(axis=1) | channel_ends.any(axis=1) | port_ends.any(axis=1))
        ahead = (pending - slot) % size
        candidates = [waiting.min()] if len(waiting) else []
        candidates += [t + ahead[ahead > 0].min()] if (ahead > 0).any() else []
        if not candidates:
            raise RuntimeError("packet simulation stalled with packets left (a routing deadlock)")
        t = int(min(candidates))
    return int(finish)


def _grant_outputs(
    cand: np.ndarray,
    nxt: np.ndarray,
    port: np.ndarray,
    width: np.ndarray,
    channel_busy: np.ndarray,
    occupied: np.ndarray,
    is_eject: np.ndarray,
    vcs: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each output channel grants its oldest requests, as many as it has free lanes (and VCs behind it)."""
    room = free_lanes(nxt, width, channel_busy, occupied, is_eject, vcs)
    pick = np.lexsort((cand, nxt))
    pick = pick[rank_in_runs(nxt[pick]) < room[pick]]
    return cand[pick], nxt[pick], port[pick]


def free_lanes(
    nxt: np.ndarray,
    width: np.ndarray,
    channel_busy: np.ndarray,
    occupied: np.ndarray,
    is_eject: np.ndarray,
    vcs: int,
) -> np.ndarray:
    """Packets channels ``nxt`` can still take this cycle: free lanes, capped by free VCs behind them."""
    room = np.where(is_eject[nxt], width[nxt], np.minimum(width[nxt], vcs - occupied[nxt]))
    return room - channel_busy[nxt]


def rank_in_runs(keys: np.ndarray) -> np.ndarray:
    """Position of every element inside its run of equal values in sorted ``keys``."""
    return np.arange(len(keys)) - np.searchsorted(keys, keys)


def _release(
    win: np.ndarray,
    at: np.ndarray,
    start: np.ndarray,
    route: np.ndarray,
    ejected: np.ndarray,
    held: int,
    t: int,
    F: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The VC frees caused by packets ``win`` taking the channel at route index ``at``.

    The VC behind channel q frees once the tail has left it (F cycles after the packet took
    channel q + 1) and, under wormhole, not before the head is ``held`` hops further (a blocked
    head keeps the tail's VCs). A packet entering its ejection port drains everything it holds.
    Returns (packet, route index q, cycle) per free; q = -1 is the packet's source queue.
    """
    behind = at - held  # the VC the head has now outrun
    rows, qs = [win], [behind]
    for k in range(1, held):  # on ejection the VCs still held free as the tail drains
        rows.append(win[ejected])
        qs.append((at - k)[ejected])
    rows, qs = np.concatenate(rows), np.concatenate(qs)
    keep = qs >= -1
    rows, qs = rows[keep], qs[keep]
    return rows, qs, np.maximum(start[rows, qs + 1] + F, t + 1)
