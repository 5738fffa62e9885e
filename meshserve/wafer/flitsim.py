"""Flit-level wormhole NoC model: virtual channels, credits and per-cycle allocation, vectorised.

Every cycle, over all virtual channels (VCs) of all routers at once (numpy):
1. flits, credits and freed VCs scheduled for this cycle land (ring buffers indexed by cycle);
2. VC allocation: a packet whose head flit sits in a VC and has no VC at the next router asks for
   a free one on its next channel; each channel grants its free VCs to the oldest requests
   (``vc_arbiter="age"``) or round robin over the requesting input VCs from the one it granted last
   (``"round_robin"``, BookSim2's arbiter kind; docs/wafer.md shows BookSim2's congested
   permutations between the two); ejection needs no VC;
3. switch allocation, BookSim2's default iSLIP with one iteration: every VC that has a flit, a
   granted VC downstream and a credit for it requests its output; each output channel grants one
   input port (round robin from the input it served last, BookSim2's default arb_type), and each
   input port accepts one of its grants (round robin over its VCs);
4. each winner sends one flit: it lands downstream after the channel's latency, the upstream
   gets the credit back after ``credit_cycles``, and a VC is freed once its tail flit has left
   and that credit has returned (BookSim's wait-for-tail-credit).
A node injects its packets in order, one flit per cycle per injection port, and a packet
holds the VCs its flits occupy (wormhole: a blocked head stalls its body in the VCs behind it).
The pipeline (routing, VC and switch allocation, traversal, wire) is folded into each channel's
latency; allocators run one iteration without speculation. Same interface as packetsim.
"""

from __future__ import annotations

import numpy as np

from meshserve.wafer.packetsim import NocParams, rank_in_runs

EJECT = -2


def simulate_flits(
    route: np.ndarray,
    source: np.ndarray,
    latency: np.ndarray,
    is_eject: np.ndarray,
    params: NocParams,
    credit_cycles: int = 1,
    width: np.ndarray | None = None,
    vc_arbiter: str = "age",
) -> int:
    """Cycles until the last flit has arrived (route, source, latency, is_eject as in packetsim).

    width[c]: flits channel c carries per cycle (None: 1 everywhere). A node has as many injection
    ports as its injection channel's width: that many of its packets are sent at once, and the
    router input behind a wide channel, like a wide ejection channel, moves that many flits a cycle.
    """
    F, V, B = params.flits_per_packet, params.vcs, params.vc_buffer_flits
    num = len(route)
    if num == 0:
        return 0
    latency = np.asarray(latency, dtype=np.int64)
    C = len(latency)
    width = np.ones(C, dtype=np.int64) if width is None else np.maximum(np.asarray(width, np.int64), 1)
    nodes = int(source.max()) + 1
    P = int(width[route[:, 0]].max())  # injection ports per node (its injection channel's width)
    U = C * V + nodes * P  # real VCs (channel c's VCs are c*V .. c*V+V-1), then P senders per node
    pkt = np.full(U, -1, dtype=np.int64)
    hop = np.full(U, -1, dtype=np.int64)  # route index of the channel that feeds the VC
    got = np.zeros(U, dtype=np.int64)  # flits of its packet arrived
    sent = np.zeros(U, dtype=np.int64)  # flits of its packet gone on
    out = np.full(U, -1, dtype=np.int64)  # granted VC downstream, EJECT, or -1
    credit = np.full(U, B, dtype=np.int64)  # free slots the upstream may still fill
    port = np.concatenate([np.repeat(np.arange(C), V), C + np.repeat(np.arange(nodes), P)])
    reads = np.concatenate([width, np.full(nodes, P)])  # flits an input port passes per cycle
    # each node's queue of packets, in id order
    queue = np.lexsort((np.arange(num), source))
    first = np.searchsorted(source[queue], np.arange(nodes))
    last = np.searchsorted(source[queue], np.arange(nodes), side="right")
    nextq = first.copy()

    def load(u: np.ndarray) -> None:
        """Put each sender's node's next queued packet into it (or empty it); u: distinct nodes."""
        nodes_idx = (u - C * V) // P
        has = nextq[nodes_idx] < last[nodes_idx]
        pkt[u] = np.where(has, queue[np.minimum(nextq[nodes_idx], num - 1)], -1)
        hop[u], got[u], sent[u], out[u] = -1, F, 0, -1
        nextq[nodes_idx] += has

    for k in range(P):  # sender k of every node, one batch per port so each takes its own packet
        load(C * V + np.arange(nodes) * P + k)
    size = int(max(latency.max(), credit_cycles)) + 2
    arrive = np.zeros((size, U), dtype=np.int64)
    returned = np.zeros((size, U), dtype=np.int64)
    freed = np.zeros((size, U), dtype=bool)
    last_in = np.full(C, -1, dtype=np.int64)  # each output's round-robin pointer: the input it last served
    last_vc_in = np.full(C, -1, dtype=np.int64)  # the same for VC allocation (vc_arbiter="round_robin")
    num_in = C + nodes
    t, finish, delivered = 0, 0, 0
    while delivered < num:
        slot = t % size
        got += arrive[slot]
        credit += returned[slot]
        arrive[slot] = 0
        returned[slot] = 0
        if freed[slot].any():
            f = freed[slot]
            pkt[f], hop[f], got[f], sent[f], out[f] = -1, -1, 0, 0, -1
            freed[slot] = False
        live = np.flatnonzero(pkt >= 0)
        waiting = live[(out[live] == -1) & (got[live] > sent[live])]
        if len(waiting):
            if vc_arbiter == "age":
                priority = pkt[waiting]
            else:
                nxt = route[pkt[waiting], hop[waiting] + 1]
                in_vc = port[waiting] * V + waiting % V
                priority = (in_vc - last_vc_in[nxt] - 1) % (num_in * V)
            granted = _allocate_vcs(waiting, priority, pkt, hop, got, sent, out, route, is_eject, C, V)
            last_vc_in[route[pkt[granted], hop[granted] + 1]] = port[granted] * V + granted % V
        ready = live[out[live] != -1]
        o = out[ready]
        ready = ready[(got[ready] > sent[ready]) & ((o == EJECT) | (credit[np.maximum(o, 0)] > 0))]
        if len(ready) == 0:
            pending = np.flatnonzero(arrive.any(axis=1) | returned.any(axis=1) | freed.any(axis=1))
            if len(pending) == 0:
                raise RuntimeError("flit simulation stalled with packets left (a routing deadlock)")
            ahead = (pending - slot) % size
            t += int(ahead[ahead > 0].min()) if (ahead > 0).any() else 1
            continue
        chan = np.where(out[ready] == EJECT, route[pkt[ready], hop[ready] + 1], out[ready] // V)
        # iSLIP, one iteration: every output grants as many requests as its width, round robin over input
        # ports from the one it served last (then over VCs); every input port accepts as many grants as
        # it reads flits a cycle, round robin over its VCs. (Input-first allocation, where a port picks
        # one VC before knowing whether its output is free, idles ports that iSLIP keeps busy.)
        pick = np.lexsort(((ready - t) % V, (port[ready] - last_in[chan] - 1) % num_in, chan))
        granted, chan = ready[pick], chan[pick]
        keep = rank_in_runs(chan) < width[chan]
        granted, chan = granted[keep], chan[keep]
        pick = np.lexsort(((granted - t) % V, port[granted]))
        granted, chan = granted[pick], chan[pick]
        ports = port[granted]
        keep = rank_in_runs(ports) < reads[ports]
        win, chan = granted[keep], chan[keep]
        last_in[chan] = port[win]
        sent[win] += 1
        to_vc = out[win] != EJECT
        target = out[win][to_vc]
        credit[target] -= 1
        arrive[(t + latency[chan[to_vc]]) % size, target] += 1
        real = win < C * V
        back = (t + credit_cycles) % size
        returned[back, win[real]] += 1
        tail = sent[win] == F
        freed[back, win[tail & real]] = True
        done_sending = win[tail & ~real]
        for k in range(P):  # one sender per node at a time, so two never take the same packet
            batch = done_sending[(done_sending - C * V) % P == k]
            if len(batch):
                load(batch)
        ejected = tail & ~to_vc
        if ejected.any():
            delivered += int(ejected.sum())
            finish = max(finish, t + int(latency[chan[ejected]].max()) + 1)
        t += 1
    return int(finish)


def _allocate_vcs(waiting, priority, pkt, hop, got, sent, out, route, is_eject, C: int, V: int) -> np.ndarray:
    """Grant the waiting heads a free VC on their next channel, lowest priority value first; returns
    the heads granted a VC (not those that eject)."""
    nxt = route[pkt[waiting], hop[waiting] + 1]
    eject = is_eject[nxt]
    out[waiting[eject]] = EJECT
    waiting, nxt, priority = waiting[~eject], nxt[~eject], priority[~eject]
    if len(waiting) == 0:
        return waiting
    free = np.flatnonzero(pkt[: C * V] < 0)
    free_chan = free // V
    order = np.lexsort((priority, nxt))
    waiting, nxt = waiting[order], nxt[order]
    rank = np.arange(len(nxt)) - np.searchsorted(nxt, nxt)
    start = np.searchsorted(free_chan, nxt)
    count = np.searchsorted(free_chan, nxt, side="right") - start
    grant = rank < count
    vc = free[start[grant] + rank[grant]]
    w = waiting[grant]
    out[w] = vc
    pkt[vc], hop[vc], got[vc], sent[vc], out[vc] = pkt[w], hop[w] + 1, 0, 0, -1
    return w
