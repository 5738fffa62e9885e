"""EPLB-style greedy balancer (DeepSeek EPLB's global policy), recomputed from scratch.

1. Replicate: give the redundant replicas one by one to the expert with the highest load per
   replica (load_e / replicas_e).
2. Pack: take replicas heaviest first and put each on the least-loaded device that has a free
   slot and no copy of that expert yet.

Both loops run over replicas, vectorised across layers. The new packing ignores where experts
were, so most slots change: migration is large, and it is invasive (inference waits for it).
"""

from __future__ import annotations

import numpy as np

from meshserve.placement.cost import DeviceCost, keep_faster, layer_time
from meshserve.placement.plan import Placement, count_true, true_indices
from meshserve.placement.policy import Balancer


def replicate_steps(load: np.ndarray, extra: int, max_replicas: int, stops: list[int]) -> np.ndarray:
    """Replica counts [len(stops), layers, experts] after each of ``stops`` replicas were added, one
    by one, each to the expert with the most load per replica."""
    layers, experts = load.shape
    reps = np.ones((layers, experts), dtype=np.int64)
    rows = np.arange(layers)
    out = [reps.copy()] if 0 in stops else []
    for step in range(1, max(stops, default=0) + 1):
        per = np.where(reps < max_replicas, load / reps, -np.inf)
        reps[rows, per.argmax(axis=1)] += 1
        if step in stops:
            out.append(reps.copy())
    return np.stack(out)


def pack(
    load: np.ndarray,
    reps: np.ndarray,
    num_devices: int,
    slots: int,
    current: np.ndarray | None = None,
    hops: np.ndarray | None = None,
    slack: float = 0.0,
    cost: DeviceCost | None = None,
    bound: np.ndarray | None = None,
) -> np.ndarray:
    """Balanced packing: replica table [layers, experts, devices] for replica counts ``reps``.

    Each replica, heaviest first, goes where it leaves the device least loaded: tokens, or with a
    ``cost`` the device's predicted roofline time (its weight reads count). With ``current``
    (today's table) and ``hops``, packing is movement-aware: each replica may go to any device it
    does not push more than ``slack`` (a fraction) past ``bound`` (per layer; default a perfectly
    even share), and among those it takes the one that already holds the expert, else the one
    nearest a current holder: the fewest bytes x hops of copying (every copy is one expert's
    bytes, so hops rank them) for about EPLB's balance. Layers may have different replica counts.

    One step per replica rank, vectorised over layers. Layers are taken most replicas first, so
    the layers still placing at rank i are a prefix: a stack of options with fewer replicas
    (timed_plan's) costs only its own ranks. Each step writes its scores into reused buffers.
    """
    layers, experts = load.shape
    if bound is None:
        ideal = load.sum(axis=1, keepdims=True) / num_devices  # [layers, 1]: a perfectly even share
        if cost is not None:
            ideal = cost.score(ideal, reps.sum(axis=1, keepdims=True) / num_devices)
    else:
        ideal = np.asarray(bound, dtype=np.float64).reshape(layers, 1)
    count = reps.sum(axis=1)
    by_count = np.argsort(-count, kind="stable")  # the layers, most replicas first
    count, ideal = count[by_count], ideal[by_count]
    width = int(count.max(initial=0))
    active = (count[None, :] > np.arange(width)[:, None]).sum(axis=1)  # layers placing at each rank
    expert, weight = heaviest_first(load[by_count], reps[by_count], width)  # [width, layers]
    holds = np.zeros((layers * experts, num_devices), dtype=bool)  # row: layer (by_count) x experts + expert
    first = np.arange(layers) * experts  # each layer's first row in holds
    used = np.zeros((layers, num_devices), dtype=np.int64)
    full = np.zeros((layers, num_devices), dtype=bool)
    dev_load = np.zeros((layers, num_devices))
    tokens, score, scratch = (np.empty((layers, num_devices)) for _ in range(3))  # reused buffers
    blocked_rows, fits_rows = (np.empty((layers, num_devices), dtype=bool) for _ in range(2))
    near = None
    if current is not None:  # hops to the nearest holder, rows as holds'
        near = nearest_holder(current, np.asarray(hops, dtype=np.float64))[by_count]
        near, hops_rows = (
            near.reshape(layers * experts, num_devices),
            np.empty((layers, num_devices), near.dtype),
        )
    limit, twice = ideal * (1.0 + slack), 2 * ideal
    if cost is not None:  # DeviceCost.score's terms, in its order; the weight term kept per device
        fc, cpt, io, a2a = (
            cost.fixed_compute_s,
            cost.compute_s_per_token,
            cost.io_s_per_token,
            cost.a2a_s_per_token,
        )
        memory = cost.fixed_memory_s + (used + 1) * cost.weight_s_per_expert
    everyone = np.arange(layers)
    for i in range(width):
        m = int(active[i])
        rows, w = everyone[:m], weight[i, :m, None]
        item = first[:m] + expert[i, :m]
        # the devices that hold this expert already, or are full (np.take: rows of holds, no fancy index)
        blocked = np.take(holds, item, axis=0, out=blocked_rows[:m])
        blocked |= full[:m]
        after = np.add(dev_load[:m], w, out=tokens[:m])  # the device's tokens with this replica
        if cost is not None:  # max(fc + tokens x cpt, memory + tokens x io) + tokens x a2a
            t, after, other = after, np.multiply(after, cpt, out=score[:m]), scratch[:m]
            after += fc
            np.multiply(t, io, out=other)
            other += memory[:m]
            np.maximum(after, other, out=after)
            after += np.multiply(t, a2a, out=other)
        np.putmask(after, blocked, np.inf)  # 3x faster than copyto(where=) on these shapes
        if near is None:
            choice = after.argmin(axis=1)
        else:
            # devices this replica does not push past the (finite) bound (a blocked one is inf: never), or the
            # least loaded
            close = np.less_equal(after, limit[:m], out=fits_rows[:m])
            some = close.any(axis=1)
            if not some.all():
                close = np.where(some[:, None], close, after == after.min(axis=1, keepdims=True))
            hops_to = np.take(near, item, axis=0, out=hops_rows[:m])  # 0 where it already holds the expert
            np.putmask(hops_to, ~close, np.inf)
            choice = (hops_to + np.divide(after, twice[:m], out=scratch[:m])).argmin(axis=1)
        placed = ~blocked[rows, choice]  # a layer with no room left for this expert drops the replica
        r, c, at, w = (
            (rows, choice, item, w[:, 0])
            if placed.all()
            else (rows[placed], choice[placed], item[placed], w[placed, 0])
        )
        holds[at, c] = True
        used[r, c] += 1
        full[r, c] = used[r, c] >= slots
        dev_load[r, c] += w
        if cost is not None:
            memory[r, c] = cost.fixed_memory_s + (used[r, c] + 1) * cost.weight_s_per_expert
    out = np.empty((layers, experts, num_devices), dtype=bool)
    out[by_count] = holds.reshape(layers, experts, num_devices)
    return out


def heaviest_first(load: np.ndarray, reps: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's replicas as (expert, tokens) [width, layers], heaviest first (ties: lower expert).

    A replica carries load / reps of its expert's tokens; a layer with fewer than ``width``
    replicas is padded at its end (expert 0, weight 0: never reached, pack stops each layer at
    its count).
    """
    layers, experts = load.shape
    per = np.where(reps > 0, load / np.maximum(reps, 1), -np.inf)  # an expert with no replica: none
    # every (layer, expert) pair repeated reps times, in expert order, then sorted by weight
    layer = np.repeat(np.arange(layers), reps.sum(axis=1))
    item = np.repeat(np.tile(np.arange(experts), layers), reps.ravel())
    rank = np.arange(len(item)) - np.searchsorted(layer, layer)
    expert = np.zeros((layers, width), dtype=np.int64)
    weight = np.full((layers, width), -np.inf)
    expert[layer, rank], weight[layer, rank] = item, per[layer, item]
    order = np.argsort(-weight, axis=1, kind="stable")
    expert = np.take_along_axis(expert, order, axis=1)
    weight = np.maximum(np.take_along_axis(weight, order, axis=1), 0.0)
    return np.ascontiguousarray(expert.T), np.ascontiguousarray(weight.T)


def relabel(holds: np.ndarray, current: np.ndarray, hops: np.ndarray) -> np.ndarray:
    """``holds`` with each layer's devices permuted so its replicas move the least from ``current``.

    A packing's balance does not depend on which device gets which bin of replicas, so each bin
    (a device's replicas in ``holds``) is given to the device nearest its experts' current holders
    (cost: sum of hops to the nearest holder, 0 where the device holds it already). Assignment in
    rounds, all layers at once: every bin left proposes to its cheapest free device, every device
    keeps its cheapest proposal.
    """
    layers, experts, devices = holds.shape
    near = nearest_holder(current, np.asarray(hops, dtype=np.float64))  # [L, E, D]
    most = int(count_true(holds, 1).max())
    member, present = ranked(holds.transpose(0, 2, 1), most)  # [L, bin, slot]: experts of each bin
    member, present = member.transpose(0, 2, 1), present.transpose(0, 2, 1)  # [L, slot, bin]
    gathered = np.take_along_axis(near, member.transpose(0, 2, 1).reshape(layers, -1)[:, :, None], axis=1)
    gathered = gathered.reshape(layers, devices, most, devices)  # [L, bin, slot, D]
    cost = np.where(present.transpose(0, 2, 1)[..., None], gathered, 0.0).sum(axis=2)  # [L, bins, D]
    rows = np.arange(layers)[:, None]
    device_of = np.full((layers, devices), -1)
    free = np.ones((layers, devices), dtype=bool)
    layer, bin_ = np.nonzero(device_of < 0)  # the bins left, in (layer, bin) order
    while len(layer):  # each round only over the bins left (most are placed in the first rounds)
        open_cost = np.where(free[layer], cost[layer, bin_], np.inf)  # [left, D]
        want = open_cost.argmin(axis=1)
        price = open_cost[np.arange(len(layer)), want]
        key = layer * devices + want
        order = np.lexsort((price, key))
        first = np.ones(len(order), dtype=bool)
        first[1:] = key[order][1:] != key[order][:-1]
        win = order[first]
        device_of[layer[win], bin_[win]] = want[win]
        free[layer[win], want[win]] = False
        left = np.ones(len(layer), dtype=bool)
        left[win] = False
        layer, bin_ = layer[left], bin_[left]
    out = np.zeros_like(holds)
    out[rows[:, :, None], np.arange(experts)[None, :, None], device_of[:, None, :]] = holds
    return out


def ranked(holds: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """Where ``holds`` [a, b, c] is True along its last axis, in order: (index [a, b, most], present).

    Row (i, j) lists the c's with holds[i, j, c], ascending, then zeros (present False there):
    what a stable argsort of ~holds gives for the True entries, without sorting every row.
    """
    i, j, k = true_indices(holds)
    row = i * holds.shape[1] + j  # ascending: np.nonzero walks in C order
    rank = np.arange(len(row)) - np.searchsorted(row, row)
    index = np.zeros((*holds.shape[:2], most), dtype=np.int64)
    present = np.zeros((*holds.shape[:2], most), dtype=bool)
    index[i, j, rank], present[i, j, rank] = k, True
    return index, present


def nearest_holder(holds: np.ndarray, hops: np.ndarray) -> np.ndarray:
    """[layers, experts, devices] hops from each device to the nearest holder of each expert (0 = holds)."""
    most = int(count_true(holds, 2).max())
    # the holders of each (layer, expert), padded with the first one, as [layers, experts, most]
    order, present = ranked(holds, most)
    holder = np.where(present, order, order[:, :, :1])
    hops = np.asarray(hops, dtype=np.float32)
    near = hops[holder[:, :, 0]]
    for k in range(1, most):  # one [layers, experts, devices] slab per holder rank, not all at once
        np.minimum(near, hops[holder[:, :, k]], out=near)
    return near


class GreedyBalancer(Balancer):
    """EPLB-style greedy: periodic, from scratch, invasive (by roofline time when given a cost)."""

    name = "greedy"
    invasive = True

    def plan(self, load: np.ndarray, current: Placement, base: Placement) -> Placement:
        if self.cost is not None:
            holds, _, _ = timed_plan(load, current, self.num_redundant_experts, self.cost)
            return Placement(keep_faster(holds, current.holds, load, self.cost), current.slots_per_device)
        reps = replica_counts(load, current, self.num_redundant_experts)
        # Packing heaviest first always finds a slot for an expert's first replica (total replicas
        # <= slots), so every expert keeps at least one copy.
        holds = pack(load, reps, current.num_devices, current.slots_per_device)
        return Placement(holds, current.slots_per_device)


def replica_counts(load: np.ndarray, current: Placement, redundant: int) -> np.ndarray:
    """EPLB's replica counts: the static layout's copies (one per device at least) plus the redundant ones."""
    return replica_options(load, current, redundant, (1.0,))[0]


def replica_options(
    load: np.ndarray, current: Placement, redundant: int, fractions: tuple[float, ...]
) -> np.ndarray:
    """EPLB's replica counts with only a ``fraction`` of its extra replicas: [fractions, layers, experts]."""
    devices, experts = current.num_devices, current.num_experts
    extra = max(experts, devices) - experts + redundant
    extra = min(extra, devices * current.slots_per_device - experts)
    return replicate_steps(load, extra, devices, sorted({round(f * extra) for f in fractions}))


# How many of EPLB's extra replicas a roofline plan tries: a replica pays only where the time it
# takes off a hot die exceeds the weight reads it adds to a cold one, so fewer can be faster.
REPLICA_FRACTIONS = (0.0, 0.5, 1.0)


def timed_plan(
    load: np.ndarray, current: Placement, redundant: int, cost: DeviceCost
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB by roofline time: (holds, replica counts, predicted time) [layers, ...] of the fastest option.

    Every option of :func:`replica_options` is packed by predicted device time, and EPLB's own
    token packing is one more option; each layer keeps the option whose predicted time is lowest
    (so it is never slower than EPLB's plan). The options are packed as one stack of layers.
    """
    options = replica_options(load, current, redundant, REPLICA_FRACTIONS)  # [K, L, E]
    k, layers, experts = options.shape
    devices, slots = current.num_devices, current.slots_per_device
    stacked = np.tile(load, (k, 1))
    timed = pack(stacked, options.reshape(-1, experts), devices, slots, cost=cost)
    packs = np.concatenate(
        [timed.reshape(k, layers, experts, devices), pack(load, options[-1], devices, slots)[None]]
    )
    options = np.concatenate([options, options[-1:]])
    times = layer_time(packs.reshape(-1, experts, devices), np.tile(load, (k + 1, 1)), cost)
    times = times.reshape(k + 1, layers)
    best, rows = times.argmin(axis=0), np.arange(layers)
    return packs[best, rows], options[best, rows], times[best, rows]
