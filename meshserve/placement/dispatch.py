"""How an expert's tokens are split among its replicas at dispatch time.

``even`` (EPLB's and the paper's rule, Placement.device_load): every replica serves the same share
of its expert's tokens, whatever the iteration's draw. ``balanced`` (ours): the dispatcher knows
the iteration's per-expert token counts (one small all-gather of counts per layer, which the
simulator charges) and splits each replicated expert's tokens so that device loads are as even as
the replica table allows. Replicas then absorb each iteration's sampling noise and the drift since
the plan, as long as the devices they join form large groups: :func:`join_replicas` links the
small groups a packer leaves (EPLB packs two replicas each of two experts onto the same two
devices, so most groups are pairs).
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from meshserve.errors import require
from meshserve.placement.plan import Placement, count_true, true_indices

DISPATCH_RULES = ("even", "balanced")


def check_rule(rule: str) -> None:
    """An unknown dispatch rule is an input error naming the ``dispatch`` field."""
    require(rule in DISPATCH_RULES, "dispatch", f"unknown {rule!r}; allowed: {', '.join(DISPATCH_RULES)}")


def device_load(placement: Placement, counts: np.ndarray, rule: str = "even", sweeps: int = 32) -> np.ndarray:
    """Tokens per device [..., layers, devices] of counts [..., layers, experts] under a dispatch rule."""
    check_rule(rule)
    if rule == "even":
        return placement.device_load(counts)
    return balanced_load(placement, counts, sweeps)


def balanced_load(placement: Placement, counts: np.ndarray, sweeps: int = 32) -> np.ndarray:
    """Device loads when each expert's tokens are water-filled over its replicas, ``sweeps`` times.

    A sweep gives every replicated expert, at once, the split that levels its holders' loads as
    they stand without it (the exact best split for that expert alone) and moves it part of the
    way there: 1 / the most replicated experts on any of its holders, so experts that share a
    device never overshoot it together (Jacobi with a safe step). Each sweep lowers the sum of
    squared device loads, whose minimum is also the smallest possible maximum
    (tests/placement/test_dispatch.py checks against a linear program). Float32 [..., L, N].
    """
    return _level(placement, counts, sweeps)[0]


def balanced_shares(placement: Placement, counts: np.ndarray, sweeps: int = 32) -> np.ndarray:
    """Tokens each replica serves under :func:`balanced_load`'s levelling: [..., L, E, most replicas].

    Replica j of an expert is its j-th holder in device order; an expert with r replicas has zeros
    after its r-th column (one replica: its whole count in column 0). Float32, the levelling's own
    split: what a dispatcher that routes by it sends where (engine/distributed/balanced.py).
    """
    counts = np.asarray(counts, dtype=np.float32)
    _, groups, shares = _level(placement, counts, sweeps)
    layers, experts, _ = placement.holds.shape
    lead = counts.shape[:-2]
    flat = counts.reshape(-1, layers * experts)
    out = np.zeros((len(flat), layers * experts, max(int(placement.replicas().max()), 1)), np.float32)
    out[:, :, 0] = flat
    for (_, _, _, item), share in zip(groups, shares, strict=True):
        out[:, item, : share.shape[2]] = share
    return out.reshape(*lead, layers, experts, out.shape[2])


def _level(placement: Placement, counts: np.ndarray, sweeps: int) -> tuple[np.ndarray, list, list]:
    """The levelling of :func:`balanced_load`: (device loads, replicated-expert groups, their shares)."""
    counts = np.asarray(counts, dtype=np.float32)
    layers, experts, n = placement.holds.shape
    lead = counts.shape[:-2]
    flat = counts.reshape(-1, layers * experts)  # [B, L*E]
    b = len(flat)
    load = placement.device_load(flat.reshape(b, layers, experts)).reshape(b, layers * n)  # the even split
    replicas = placement.replicas()
    crowd = count_true(placement.holds & (replicas > 1)[:, :, None], 1)  # [L, N] replicated experts there
    replicas = replicas.ravel()
    groups = []  # experts with r replicas: (counts [B, M], holders' flat (layer, device) [M, r], step, items)
    for r in np.unique(replicas[replicas > 1]):
        item = np.flatnonzero(replicas == r)
        layer, expert = np.divmod(item, experts)
        device = (np.flatnonzero(placement.holds[layer, expert]) % n).reshape(len(item), r)
        cols = layer[:, None] * n + device
        step = (1.0 / crowd.ravel()[cols].max(axis=1, keepdims=True)).astype(np.float32)
        groups.append((flat[:, item], cols, step, item))
    if not groups:
        return load.reshape(*lead, layers, n), [], []
    shares = [np.repeat(c[:, :, None] / cols.shape[1], cols.shape[1], axis=2) for c, cols, _, _ in groups]
    where = np.concatenate(
        [(np.arange(b)[:, None, None] * (layers * n) + cols[None]).ravel() for _, cols, _, _ in groups]
    )
    # every group's moves land in one buffer, in ``where``'s order (float64: a group of more than two
    # replicas levels in float64, and float32 moves convert exactly)
    moves = np.empty(len(where))
    ends = np.cumsum([b * cols.size for _, cols, _, _ in groups])
    views = [
        moves[end - b * cols.size : end].reshape(b, *cols.shape)
        for end, (_, cols, _, _) in zip(ends, groups, strict=True)
    ]
    pairs = [np.empty(s.shape, np.float32) if s.shape[2] == 2 else None for s in shares]  # scratch
    for _ in range(sweeps):
        for (c, cols, step, _), share, view, move in zip(groups, shares, views, pairs, strict=True):
            if move is None:
                others = np.take(load, cols, axis=1)  # [B, M, r] the holders' load without this expert
                others -= share
                np.subtract(_levelled(others, c), share, out=view)
                view *= step
                share += view
                continue
            np.take(load, cols, axis=1, out=move)  # two holders: the same float32 steps, in place
            move -= share
            _level_pair(move, c)
            move -= share
            move *= step
            share += move
            view[...] = move
        load += np.bincount(where, weights=moves, minlength=load.size).reshape(load.shape)
    return load.reshape(*lead, layers, n), groups, shares


def _level_pair(others: np.ndarray, count: np.ndarray) -> None:
    """:func:`_levelled` of two holders written over ``others`` [B, M, 2] (the same float32 operations)."""
    first = np.add(count, others[..., 1])
    first -= others[..., 0]
    first /= 2
    np.clip(first, 0, count, out=first)
    others[..., 0] = first
    np.subtract(count, first, out=others[..., 1])


# replicas up to which _levelled sorts by a network of min / max (r^2 / 2 array ops, each over every expert)
SORT_NETWORK_MOST = 8


def _levelled(others: np.ndarray, count: np.ndarray) -> np.ndarray:
    """[B, M, r] the split of ``count`` [B, M] over r holders that levels their loads ``others``.

    Water-filling: the k lowest holders rise to (count + their loads) / k for the largest k whose
    level still tops the k-th lowest load. Computed one holder rank at a time over all B x M
    experts at once (a sorting network of min / max, then running sums): numpy's sort and cumsum
    along a short last axis cost ~300 ns per expert, once most of `reproduce balance`'s time. The same
    float32 sums in the same order as a sort and cumsum along the axis, so the split is the same.
    """
    r = others.shape[2]
    if r == 2:  # closed form: half the difference, clipped to what there is
        first = np.clip((count + others[..., 1] - others[..., 0]) / 2, 0, count)
        return np.stack([first, count - first], axis=2)
    ranked = np.moveaxis(others, 2, 0)  # [r, B, M]: each holder rank one contiguous array
    if r > SORT_NETWORK_MOST:  # few such experts: numpy's sort, the same values in the same order
        low = list(np.moveaxis(np.sort(others, axis=2), 2, 0).copy())
    else:
        low = list(ranked.copy())
        for sweep in range(r):  # odd-even transposition: r rounds sort r values
            for k in range(sweep % 2, r - 1, 2):
                low[k], low[k + 1] = np.minimum(low[k], low[k + 1]), np.maximum(low[k], low[k + 1])
    levels, under, total = [], np.zeros(count.shape, dtype=np.int16), low[0].copy()
    for k in range(r):
        if k:
            total += low[k]  # cumsum's float32 running sum, lowest first
        # float64, as numpy divides the float32 sum by an int64 arange
        levels.append(np.divide(np.add(count, total), k + 1, dtype=np.float64))
        under += levels[k] > low[k]
    filled, fill = np.maximum(under - 1, 0), levels[0]  # the level of the most holders under it
    for k in range(1, r):
        np.copyto(fill, levels[k], where=filled == k)
    out = np.subtract(fill, ranked)
    return np.moveaxis(np.maximum(out, 0.0, out=out), 0, 2)


def for_dispatch(plan: Placement, load: np.ndarray, rule: str) -> Placement:
    """A plan as applied under a dispatch rule: a balanced dispatch gets its groups joined."""
    return join_replicas(plan, load) if rule == "balanced" else plan


def join_replicas(placement: Placement, load: np.ndarray) -> Placement:
    """Link each layer's groups of devices (joined by shared replicated experts) into one.

    Every group gives up its lightest replica that lies on a cycle (device T holds expert x, and
    another holder of x shares a second replicated expert with T: so the group stays connected
    without it); the groups, ordered by that replica's tokens (load [layers, experts]: the plan's
    forecast), form a ring in which each one's freed slot takes the next one's expert instead
    (that expert's holders are all in the next group, so the device cannot hold it already; it
    keeps its other replicas there). Replica counts and slots stay as they were; a device's load
    changes by the difference of two neighbours in that order (small; the heaviest group's device
    takes the lightest expert and gets lighter). Groups without such a replica (trees of
    replicas, which EPLB's packing rarely makes) stay as they are; the others become one.
    """
    holds = placement.holds
    layers, experts, n = holds.shape
    replicas = placement.replicas()
    multi = holds & (replicas > 1)[:, :, None]  # [L, E, N]
    # one graph over (layer, device) nodes: devices sharing a replicated expert are joined
    layer, expert, device = true_indices(multi)
    if not len(layer):  # no replicated expert: nothing to join
        return placement
    node = layer * n + device
    item = layer * experts + expert
    incidence = csr_matrix((np.ones(len(node)), (node, item)), shape=(layers * n, layers * experts))
    shared = (incidence @ incidence.T).tocsr()  # replicated experts two devices both hold
    _, group = connected_components(shared, directed=False)
    twice = shared >= 2
    twice.setdiag(False)
    on_cycle = np.asarray((twice.astype(np.float64) @ incidence)[node, item]).ravel() > 0
    if not on_cycle.any():
        return placement
    weight = np.asarray(load, dtype=np.float64)[layer, expert] / replicas[layer, expert]
    # each group's lightest replica on a cycle (ties: lowest expert, then device)
    order = np.lexsort((device, expert, weight, group[node]))
    order = order[on_cycle[order]]
    first = order[np.r_[True, np.diff(group[node][order]) != 0]]
    giver_layer, giver_weight = layer[first], weight[first]
    chain = first[np.lexsort((giver_weight, giver_layer))]
    # a ring per layer: each group takes the next one's expert, the heaviest the lightest's
    pos = np.arange(len(chain))
    starts = np.r_[True, layer[chain][1:] != layer[chain][:-1]]
    head = np.maximum.accumulate(np.where(starts, pos, 0))
    ends = np.r_[starts[1:], True]
    nxt = np.where(ends, head, pos + 1)
    ring = nxt != pos  # a layer with one group has nothing to join
    take, give = chain[ring], chain[nxt[ring]]
    out = holds.copy()
    out[layer[take], expert[take], device[take]] = False
    out[layer[take], expert[give], device[take]] = True
    return Placement(out, placement.slots_per_device)
