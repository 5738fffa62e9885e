"""balanced_load levels exactly as the sweep loop it replaced did (that loop is the oracle here), and
_levelled's water-filling by holder rank equals the sort-and-cumsum along the axis it replaced."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.placement.dispatch import _levelled, balanced_load
from meshserve.placement.plan import Placement


def sort_levelled(others: np.ndarray, count: np.ndarray) -> np.ndarray:
    """_levelled before it worked one holder rank at a time (2026-12-07): np.sort and np.cumsum along
    the holders' axis, ~300 ns per expert."""
    low = np.sort(others, axis=2)
    level = (count[..., None] + np.cumsum(low, axis=2)) / np.arange(1, others.shape[2] + 1)
    filled = np.maximum((level > low).sum(axis=2, keepdims=True) - 1, 0)
    return np.maximum(np.take_along_axis(level, filled, axis=2) - others, 0.0)


def loop_balanced_load(placement: Placement, counts: np.ndarray, sweeps: int = 32) -> np.ndarray:
    """The levelling before its moves went into one buffer (2026-12-07): a fresh gather, split and
    move array per group and sweep, concatenated for one bincount."""
    counts = np.asarray(counts, dtype=np.float32)
    layers, experts, n = placement.holds.shape
    lead = counts.shape[:-2]
    flat = counts.reshape(-1, layers * experts)
    b = len(flat)
    load = placement.device_load(flat.reshape(b, layers, experts)).reshape(b, layers * n)
    replicas = placement.replicas()
    crowd = (placement.holds & (replicas > 1)[:, :, None]).sum(axis=1)
    replicas = replicas.ravel()
    groups = []
    for r in np.unique(replicas[replicas > 1]):
        item = np.flatnonzero(replicas == r)
        layer, expert = np.divmod(item, experts)
        device = np.nonzero(placement.holds[layer, expert])[1].reshape(len(item), r)
        cols = layer[:, None] * n + device
        step = (1.0 / crowd.ravel()[cols].max(axis=1, keepdims=True)).astype(np.float32)
        groups.append((flat[:, item], cols, step))
    if not groups:
        return load.reshape(*lead, layers, n)
    shares = [np.repeat(c[:, :, None] / cols.shape[1], cols.shape[1], axis=2) for c, cols, _ in groups]
    where = np.concatenate(
        [(np.arange(b)[:, None, None] * (layers * n) + cols[None]).ravel() for _, cols, _ in groups]
    )
    for _ in range(sweeps):
        moves = []
        for (c, cols, step), share in zip(groups, shares, strict=True):
            others = load[:, cols] - share
            levelled = _levelled(others, c) if others.shape[2] == 2 else sort_levelled(others, c)
            move = step * (levelled - share)
            share += move
            moves.append(move.ravel())
        load += np.bincount(where, weights=np.concatenate(moves), minlength=load.size).reshape(load.shape)
    return load.reshape(*lead, layers, n)


@st.composite
def problems(draw):
    """A replica table with groups of 1-4 replicas (pairs only, or a mix) and counts with zeros and ties."""
    layers, experts, devices = draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(2, 8))
    most = draw(st.integers(1, min(4, devices)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    holds = np.zeros((layers, experts, devices), dtype=bool)
    for layer, expert in np.ndindex(layers, experts):
        holds[layer, expert, rng.choice(devices, rng.integers(1, most + 1), replace=False)] = True
    top = draw(st.sampled_from([1, 5, 200]))
    counts = rng.integers(0, top + 1, size=(draw(st.integers(1, 4)), layers, experts)).astype(np.float32)
    return Placement(holds, experts), counts, draw(st.sampled_from([0, 1, 3, 32]))


@settings(max_examples=200, deadline=None)
@given(problems())
def test_balanced_load_matches_the_sweep_loop_bit_for_bit(problem):
    table, counts, sweeps = problem
    np.testing.assert_array_equal(
        balanced_load(table, counts, sweeps), loop_balanced_load(table, counts, sweeps)
    )


@st.composite
def splits(draw):
    """Holders' loads [B, M, r] (r = 3 to 12: both sides of the sorting network's limit) and counts
    [B, M], with ties, zeros and negative loads (a holder's load without the expert's share)."""
    b, m, r = draw(st.integers(1, 3)), draw(st.integers(1, 20)), draw(st.integers(3, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1.0, 7.0, 1e3, 1e6]))
    others = (rng.random((b, m, r)) * scale).astype(np.float32)
    if draw(st.booleans()):
        others = np.round(others)  # ties
    others -= np.float32(scale * draw(st.sampled_from([0.0, 0.3])))
    count = np.round(rng.random((b, m)) * scale).astype(np.float32)
    return others.astype(np.float32), count


@settings(max_examples=300, deadline=None)
@given(splits())
def test_levelled_by_holder_rank_matches_the_sort_along_the_axis_bit_for_bit(split):
    others, count = split
    got = _levelled(others, count)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, sort_levelled(others, count))
