"""The engine settings, prompts and checks every distributed test shares (fixtures: conftest.py).

Every LLM with data_parallel_size > 1 starts real processes (spawn + torch.distributed gloo), so each
test builds as few as it can and bounds every wait (``step_timeout_s`` in ARGS).
"""

from __future__ import annotations

from meshserve.engine import LLM, SamplingParams

SINGLE = {"max_num_batched_tokens": 16, "max_num_seqs": 4, "block_size": 4, "max_model_len": 128}
ARGS = {**SINGLE, "step_timeout_s": 60.0}
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [
    [1, 40, 41, 42],
    [1] + list(range(50, 80)),
    [1, 7],
    [1] + list(range(100, 117)),
    [1, 9, 9],
    [1, 300, 301],
    [1, 200, 7, 7],
]


def tokens(llm: LLM, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def assert_all_exited(llm: LLM) -> None:
    assert all(not p.is_alive() for p in llm.engine.ranks.procs)


def serve_until_migrated(llm: LLM, expected: list[list[int]]) -> list[dict]:
    """Serve PROMPTS again and again (tokens checked every time) until a migration has switched in; then
    check the ranks hold its placement and serve the same tokens on it. Returns the completed migrations."""
    for _ in range(10):  # copies in the gaps between steps may need more than one round
        assert tokens(llm) == expected
        done = [m for m in llm.engine.migrations if not m.get("error")]
        if done:
            break
    assert done, "no migration completed; the test would not cover the switch"
    assert (llm.engine.holds() == done[-1]["holds_after"]).all()
    assert tokens(llm) == expected  # on the new placement
    return done
