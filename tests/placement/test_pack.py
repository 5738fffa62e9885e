"""eplb.pack places exactly what the per-replica loop it replaced placed (that loop is the oracle here)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.placement.cost import DeviceCost
from meshserve.placement.eplb import nearest_holder, pack


def loop_pack(load, reps, num_devices, slots, current=None, hops=None, slack=0.0, cost=None, bound=None):
    """The packer before it was vectorised (2026-12-07): one step per replica rank, every layer padded
    to the longest, scores rebuilt in full each step."""
    layers, experts = load.shape
    rows = np.arange(layers)
    width = int(reps.sum(axis=1).max())
    expert = np.full((layers, width), -1)
    for i in range(layers):
        items = np.repeat(np.arange(experts), reps[i])
        expert[i, : len(items)] = items
    weight = np.where(expert >= 0, np.take_along_axis(load / reps, np.maximum(expert, 0), axis=1), -np.inf)
    order = np.argsort(-weight, axis=1, kind="stable")
    expert = np.take_along_axis(expert, order, axis=1)
    weight = np.maximum(np.take_along_axis(weight, order, axis=1), 0.0)
    holds = np.zeros((layers, experts, num_devices), dtype=bool)
    used = np.zeros((layers, num_devices), dtype=np.int64)
    dev_load = np.zeros((layers, num_devices))
    near = None if current is None else nearest_holder(current, np.asarray(hops, dtype=np.float64))
    if bound is None:
        ideal = load.sum(axis=1, keepdims=True) / num_devices
        if cost is not None:
            ideal = cost.score(ideal, reps.sum(axis=1, keepdims=True) / num_devices)
    else:
        ideal = np.asarray(bound, dtype=np.float64).reshape(layers, 1)
    if cost is not None:
        memory = cost.fixed_memory_s + (used + 1) * cost.weight_s_per_expert
    for i in range(width):
        e, w = np.maximum(expert[:, i], 0), weight[:, i : i + 1]
        ok = (used < slots) & ~holds[rows, e] & (expert[:, i] >= 0)[:, None]
        tokens = dev_load + w
        if cost is None:
            after = tokens
        else:
            after = np.maximum(
                cost.fixed_compute_s + tokens * cost.compute_s_per_token,
                memory + tokens * cost.io_s_per_token,
            )
            after += tokens * cost.a2a_s_per_token
        after[~ok] = np.inf
        if near is None:
            choice = after.argmin(axis=1)
        else:
            fits = ok & (after <= ideal * (1.0 + slack))
            close = np.where(fits.any(axis=1, keepdims=True), fits, after == after.min(axis=1, keepdims=True))
            hops_to = np.where(close, near[rows, e], np.inf)
            choice = (hops_to + after / (2 * ideal)).argmin(axis=1)
        placed = ok[rows, choice]
        r, c = rows[placed], choice[placed]
        holds[r, e[placed], c] = True
        used[r, c] += 1
        dev_load[r, c] += weight[placed, i]
        if cost is not None:
            memory[r, c] = cost.fixed_memory_s + (used[r, c] + 1) * cost.weight_s_per_expert
    return holds


@st.composite
def packings(draw):
    """A random packing problem: loads with ties and zeros, uneven replica counts, every option."""
    layers, experts = draw(st.integers(1, 5)), draw(st.integers(1, 10))
    devices, slots = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    load = rng.integers(0, draw(st.sampled_from([1, 3, 50])), size=(layers, experts)).astype(np.float64)
    # 1..devices replicas per expert, each layer trimmed to fit its slots (a layer may drop some)
    reps = rng.integers(1, devices + 1, size=(layers, experts))
    kwargs = {}
    if draw(st.booleans()):
        kwargs["cost"] = DeviceCost(*rng.uniform(0.1, 2.0, size=3), *rng.uniform(0.0, 1.0, size=2))
    if draw(st.booleans()):
        kwargs["current"] = rng.random((layers, experts, devices)) < 0.4
        kwargs["current"][:, :, 0] |= ~kwargs["current"].any(axis=2)  # every expert held somewhere
        pos = rng.integers(0, 4, size=devices)
        kwargs["hops"] = np.abs(pos[:, None] - pos[None, :])
        kwargs["slack"] = draw(st.sampled_from([0.0, 0.05, 0.5]))
        if draw(st.booleans()):
            kwargs["bound"] = rng.integers(0, load.sum(axis=1).max() + 1, size=layers).astype(np.float64)
    return load, reps, devices, slots, kwargs


@settings(max_examples=300, deadline=None)
@given(packings())
def test_pack_matches_the_per_replica_loop(problem):
    load, reps, devices, slots, kwargs = problem
    with np.errstate(divide="ignore", invalid="ignore"):  # a layer with no tokens: both divide by 0
        np.testing.assert_array_equal(
            pack(load, reps, devices, slots, **kwargs), loop_pack(load, reps, devices, slots, **kwargs)
        )


def test_pack_stacked_options_match_separate_packs():
    """timed_plan's use: layers with different replica counts packed as one stack, each as if alone."""
    rng = np.random.default_rng(0)
    load = rng.integers(0, 100, size=(3, 16)).astype(np.float64)
    reps = np.stack([np.ones(16, dtype=np.int64), rng.integers(1, 3, 16), rng.integers(1, 5, 16)])
    stacked = pack(load, reps, 8, 6)
    for i in range(3):
        np.testing.assert_array_equal(stacked[i], pack(load[i : i + 1], reps[i : i + 1], 8, 6)[0])
        assert (stacked[i].sum(axis=1) <= reps[i]).all() and stacked[i].any(axis=1).all()
