"""ep_dispatch="balanced": replicas get level loads from the step's counts, and the tokens stay exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.engine import LLM
from meshserve.engine.distributed.balanced import balanced_picks, replica_bounds, replica_bounds_reference
from meshserve.engine.distributed.expert_map import ExpertMap
from meshserve.errors import InputError
from meshserve.kernels import native
from tests.engine.distributed.helpers import ARGS, assert_all_exited, tokens


def test_quotas_level_the_ranks_and_keep_every_pair():
    holds = np.array([[True, True], [False, True]])  # expert 0 on ranks 0 and 1, expert 1 on rank 1
    bounds = replica_bounds(holds, np.array([10, 6]))
    np.testing.assert_array_equal(bounds, [[8, 10], [6, 6]])  # rank 0: 8 pairs of expert 0, rank 1: 2 + 6


@st.composite
def layers(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """A replica table [experts, ranks] (every expert on some rank), the step's counts and the sweeps."""
    experts, ranks = draw(st.integers(1, 24)), draw(st.integers(1, 8))
    cells = st.lists(st.booleans(), min_size=experts * ranks, max_size=experts * ranks)
    holds = np.array(draw(cells), dtype=bool).reshape(experts, ranks)
    homes = draw(st.lists(st.integers(0, ranks - 1), min_size=experts, max_size=experts))
    holds[np.arange(experts), homes] = True
    most = draw(st.sampled_from([3, 60, 5000, 10**6]))
    counts = np.array(
        draw(st.lists(st.integers(0, most), min_size=experts, max_size=experts)), dtype=np.int64
    )
    return holds, counts, draw(st.integers(1, 40))


@settings(max_examples=300, deadline=None, database=None)
@given(layers())
def test_the_native_solve_gives_the_reference_quotas(layer):
    assert native.load(), f"native kernels missing: run `{native.BUILD_COMMAND}` (make test does)"
    holds, counts, sweeps = layer
    np.testing.assert_array_equal(
        replica_bounds(holds, counts, sweeps), replica_bounds_reference(holds, counts, sweeps)
    )


def test_every_rank_picks_its_own_pairs_and_together_they_fill_each_quota():
    rng = np.random.default_rng(0)
    for _ in range(20):
        experts, ranks = 6, 3
        holds = rng.random((1, experts, ranks)) < 0.5
        holds[0, np.arange(experts), rng.integers(0, ranks, experts)] = True
        pairs = [torch.from_numpy(rng.integers(0, experts, rng.integers(0, 30))) for _ in range(ranks)]
        counts = torch.stack([torch.bincount(p, minlength=experts) for p in pairs])
        emap = ExpertMap(holds)
        served = np.zeros((experts, ranks), dtype=np.int64)
        for rank, p in enumerate(pairs):  # each rank alone, from the gathered counts only
            dest = emap.balanced_destinations(0, p, rank, counts).numpy()
            assert holds[0, p.numpy(), dest].all()  # only to a rank that holds the expert
            np.add.at(served, (p.numpy(), dest), 1)
        bounds = replica_bounds(holds[0], counts.sum(dim=0).numpy())
        quota = np.diff(bounds, axis=1, prepend=0)
        for e in range(experts):
            np.testing.assert_array_equal(served[e, holds[0, e]], quota[e, : holds[0, e].sum()])
        # no rank is fuller than under the even rule
        even = np.zeros(ranks)
        for rank, p in enumerate(pairs):
            np.add.at(even, emap.destinations(0, p, rank).numpy(), 1)
        assert served.sum(axis=0).max() <= even.max()


def test_a_pairs_replica_depends_only_on_its_position():
    bounds = torch.tensor([[3, 6], [4, 4]])
    picks = balanced_picks(torch.tensor([0, 1, 0, 0, 0]), torch.tensor([2, 0]), bounds)
    assert picks.tolist() == [0, 0, 1, 1, 1]  # expert 0's positions 2, 3, 4, 5: replica 0 ends at 3


def test_an_unknown_dispatch_is_refused_by_name(mixtral):
    with pytest.raises(InputError, match="ep_dispatch: unknown 'lp'; allowed: even, balanced"):
        LLM(mixtral, data_parallel_size=2, enable_expert_parallel=True, ep_dispatch="lp")


def recorded_loads(llm: LLM) -> list[np.ndarray]:
    """Pairs computed per rank in each later step, [rank, moe_layer] (last_stats["routed"])."""
    loads, step = [], llm.engine.step

    def recording():  # noqa: ANN202 - the engine's own step, its stats kept
        out = step()
        loads.append(llm.engine.last_stats["routed"])
        return out

    llm.engine.step = recording
    return loads


def max_over_mean(loads: list[np.ndarray]) -> float:
    """Max over ranks / mean over ranks, per step and MoE layer, averaged where some rank had pairs."""
    routed = np.stack(loads).astype(float)  # [step, rank, layer]
    mean = routed.mean(axis=1)
    return float((routed.max(axis=1)[mean > 0] / mean[mean > 0]).mean())


def test_balanced_dispatch_gives_the_even_splits_tokens_with_level_ranks(mixtral, expected):
    # every expert on rank 0, experts 0 and 1 also on rank 1: the even split leaves rank 0 the heavier
    holds = np.zeros((2, 4, 2), dtype=bool)
    holds[:, :, 0] = True
    holds[:, :2, 1] = True
    loads = {}
    for rule in ("even", "balanced"):
        with LLM(
            mixtral,
            data_parallel_size=2,
            enable_expert_parallel=True,
            expert_placement=holds,
            ep_dispatch=rule,
            **ARGS,
        ) as llm:
            steps = recorded_loads(llm)
            assert tokens(llm) == expected
            loads[rule] = max_over_mean(steps)
        assert_all_exited(llm)
    assert loads["balanced"] < loads["even"]
