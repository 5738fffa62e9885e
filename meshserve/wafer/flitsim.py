"""Flit-level wormhole NoC model: virtual channels, credits and per-cycle allocation, vectorised.

Every cycle, over all virtual channels (VCs) of all routers at once (numpy):
1. flits and credits scheduled for this cycle land (ring buffers indexed by cycle);
2. VC allocation, one iSLIP iteration as BookSim2's default: a packet whose head flit sits in a
   VC and has no VC at the next router asks for every free VC on its next channel; each VC grants
   the oldest request (``vc_arbiter="age"``) or the next input VC round robin from the one its
   channel granted last (``"round_robin"``, BookSim2's arbiter kind), and each head accepts the
   granted VC that comes first after the one it took last; ejection needs no VC;
3. switch allocation, BookSim2's default iSLIP with one iteration: every VC that has a flit, a
   granted VC downstream and a credit for it requests its output; each output channel grants one
   input port (round robin from the input it served last, BookSim2's default arb_type), and each
   input port accepts one of its grants (round robin over its VCs);
4. each winner sends one flit: it lands downstream after the channel's latency and the upstream
   gets the credit back after ``credit_cycles``. As in BookSim2's default (wait_for_tail_credit =
   0), a VC may be granted to another packet once the last one's tail was sent into it: the new
   packet's flits queue behind that tail in the same buffer (at most two packets per VC).
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
    # BookSim2's default (wait_for_tail_credit = 0): a VC may be granted to the next packet as soon as
    # its last packet's tail was sent into it; that packet waits behind the first in the same buffer
    nxt_pkt = np.full(U, -1, dtype=np.int64)  # the packet queued behind the front one, or -1
    nxt_hop = np.full(U, -1, dtype=np.int64)
    nxt_got = np.zeros(U, dtype=np.int64)
    tail_in = np.zeros(U, dtype=bool)  # the last packet granted this VC has sent its tail into it
    in_ptr = np.full(U, -1, dtype=np.int64)  # the downstream VC each VC's packet accepted last
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
    last_in = np.full(C, -1, dtype=np.int64)  # each output's round-robin pointer: the input it last served
    last_vc_in = np.full(C, -1, dtype=np.int64)  # the same for VC allocation (vc_arbiter="round_robin")
    num_in = C + nodes
    t, finish, delivered = 0, 0, 0
    while delivered < num:
        slot = t % size
        landed = arrive[slot]
        front = np.minimum(landed, np.where(pkt >= 0, F - got, 0))  # arrivals in order: the front's first
        got += front
        nxt_got += landed - front
        credit += returned[slot]
        arrive[slot] = 0
        returned[slot] = 0
        live = np.flatnonzero(pkt >= 0)
        waiting = live[(out[live] == -1) & (got[live] > sent[live])]
        if len(waiting):
            if vc_arbiter == "age":
                priority = pkt[waiting]
            else:
                nxt = route[pkt[waiting], hop[waiting] + 1]
                in_vc = port[waiting] * V + waiting % V
                priority = (in_vc - last_vc_in[nxt] - 1) % (num_in * V)
            state = (pkt, hop, got, sent, out, nxt_pkt, nxt_hop, nxt_got, tail_in)
            granted = _allocate_vcs(waiting, priority, state, in_ptr, route, is_eject, C, V)
            last_vc_in[route[pkt[granted], hop[granted] + 1]] = port[granted] * V + granted % V
        ready = live[out[live] != -1]
        o = out[ready]
        ready = ready[(got[ready] > sent[ready]) & ((o == EJECT) | (credit[np.maximum(o, 0)] > 0))]
        if len(ready) == 0:
            pending = np.flatnonzero(arrive.any(axis=1) | returned.any(axis=1))
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
        tail_in[target[tail[to_vc]]] = True
        _pop_front(win[tail & real], pkt, hop, got, sent, out, nxt_pkt, nxt_hop, nxt_got)
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


def _allocate_vcs(waiting, priority, state, in_ptr, route, is_eject, C: int, V: int) -> np.ndarray:
    """One iSLIP iteration of VC allocation (BookSim2's default): every waiting head asks for every free
    VC of its next channel, each VC grants the request of lowest priority value, and each head accepts
    the granted VC that comes first after the one it accepted last (round robin). A VC is free when
    empty, or when its one packet's tail is in: the granted packet then queues behind that one. Returns
    the heads granted a VC (not those that eject)."""
    pkt, hop, got, sent, out, nxt_pkt, nxt_hop, nxt_got, tail_in = state
    nxt = route[pkt[waiting], hop[waiting] + 1]
    eject = is_eject[nxt]
    out[waiting[eject]] = EJECT
    waiting, nxt, priority = waiting[~eject], nxt[~eject], priority[~eject]
    if len(waiting) == 0:
        return waiting
    real = slice(0, C * V)
    free = np.flatnonzero((pkt[real] < 0) | ((nxt_pkt[real] < 0) & tail_in[real]))
    head, vc = _islip_match(waiting, nxt, priority, free, in_ptr, V)
    w = waiting[head]
    in_ptr[w] = vc
    out[w] = vc
    tail_in[vc] = False
    empty = pkt[vc] < 0
    e, q = vc[empty], vc[~empty]
    pkt[e], hop[e], got[e], sent[e], out[e] = pkt[w[empty]], hop[w[empty]] + 1, 0, 0, -1
    nxt_pkt[q], nxt_hop[q], nxt_got[q] = pkt[w[~empty]], hop[w[~empty]] + 1, 0
    return w


def _islip_match(waiting, nxt, priority, free, in_ptr, V: int) -> tuple[np.ndarray, np.ndarray]:
    """One request-grant-accept round: (indexes into waiting, the VC each accepted)."""
    start = np.searchsorted(free // V, nxt)
    count = np.searchsorted(free // V, nxt, side="right") - start
    head = np.repeat(np.arange(len(waiting)), count)
    offset = np.arange(len(head)) - np.repeat(np.cumsum(count) - count, count)
    vc = free[np.repeat(start, count) + offset]
    order = np.lexsort((priority[head], vc))  # grant: each VC to its lowest-priority-value request
    head, vc = head[order], vc[order]
    keep = rank_in_runs(vc) == 0
    head, vc = head[keep], vc[keep]
    order = np.lexsort(((vc - in_ptr[waiting[head]] - 1) % V, head))  # accept: round robin per head
    head, vc = head[order], vc[order]
    keep = rank_in_runs(head) == 0
    return head[keep], vc[keep]


def _pop_front(vc, pkt, hop, got, sent, out, nxt_pkt, nxt_hop, nxt_got) -> None:
    """The front packets of these VCs have sent their tails on: the packet queued behind (if any) moves up."""
    pkt[vc], hop[vc], got[vc] = nxt_pkt[vc], nxt_hop[vc], nxt_got[vc]
    sent[vc], out[vc] = 0, -1
    nxt_pkt[vc], nxt_hop[vc], nxt_got[vc] = -1, -1, 0
