"""Live expert migration: tokens stay the single-process engine's while copies are in flight, across the
switch, and when a migration stalls (then the old placement keeps serving and the error is reported)."""

from __future__ import annotations

import pytest

from meshserve.engine import LLM
from meshserve.engine.distributed.worker import FAULT_ENV
from tests.engine.distributed.helpers import ARGS, serve_until_migrated, tokens


def generate_until_migrated(
    mixtral: str, ranks: int, expected: list[list[int]], dispatch: str = "even", **eplb
) -> list[dict]:
    """Serve PROMPTS again and again (tokens checked every time) until a migration has switched in."""
    config = {"window_size": 2, "step_interval": 2, "num_redundant_experts": 2, "chunk_bytes": 16384, **eplb}
    with LLM(
        mixtral,
        data_parallel_size=ranks,
        oversubscribe=True,  # 4 ranks on a 2-core CI machine: slow, still correct
        enable_expert_parallel=True,
        enable_eplb=True,
        eplb_config=config,
        ep_dispatch=dispatch,
        **ARGS,
    ) as llm:
        serve_until_migrated(llm, expected)
    return llm.engine.migrations


def test_non_invasive_migration_on_four_ranks_keeps_the_tokens(mixtral, expected):
    migrations = generate_until_migrated(mixtral, 4, expected, mode="non-invasive", balancer="greedy")
    done = [m for m in migrations if not m.get("error")]
    assert all(m["switch_tick"] > m["tick"] for m in done)  # steps ran while the copies were in flight
    # Gaps move at least the busiest rank's bytes / step_interval (2 here): a migration lands within
    # step_interval gaps, one more for the chunk that did not fit, and the switch at the next boundary.
    assert all(m["switch_tick"] - m["tick"] <= 4 for m in done), [(m["tick"], m["switch_tick"]) for m in done]
    assert all(m["bytes"] > 0 and m["copies"] > 0 for m in done)


def test_a_balanced_dispatch_migrates_to_joined_plans_and_keeps_the_tokens(mixtral, expected):
    migrations = generate_until_migrated(mixtral, 2, expected, "balanced", mode="invasive", balancer="greedy")
    assert migrations and not any(m.get("error") for m in migrations)
    # the planner's table as the ranks dispatch it (eplb.live_policy), scored on the levelled loads
    assert all(m["balancedness_after"] >= m["balancedness_before"] - 1e-9 for m in migrations)


@pytest.mark.slow
def test_invasive_migration_keeps_the_tokens(mixtral, expected):
    migrations = generate_until_migrated(mixtral, 2, expected, mode="invasive", balancer="topology")
    assert all(m["switch_tick"] == m["tick"] for m in migrations)  # the step waited for the copies


def test_a_stalled_migration_is_reported_and_the_old_placement_keeps_serving(mixtral, expected, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "stall:0")  # rank 0 never sends its chunks
    config = {"window_size": 2, "step_interval": 2, "num_redundant_experts": 2, "migration_timeout_s": 0.2}
    with LLM(
        mixtral,
        data_parallel_size=2,
        enable_expert_parallel=True,
        enable_eplb=True,
        eplb_config=config,
        **ARGS,
    ) as llm:
        for _ in range(10):  # until the receiver's wait times out
            assert tokens(llm) == expected
            if llm.engine.migrations:
                break
        assert "expert migration stalled (rank 1: RuntimeError" in llm.engine.migrations[0]["error"]
        assert tokens(llm) == expected
