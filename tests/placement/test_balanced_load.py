"""balanced_load levels exactly as the sweep loop it replaced did (that loop is the oracle here)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.placement.dispatch import _levelled, balanced_load
from meshserve.placement.plan import Placement


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
            move = step * (_levelled(others, c) - share)
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
