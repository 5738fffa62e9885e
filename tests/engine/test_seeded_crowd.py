"""A seeded request's tokens are a function of its prompt, settings and seed alone: the same alone or in any
crowd (which pauses speculation past ``disable_by_batch_size``), with speculation off, by n-gram or by a
draft model, and with any chunk budget. Every draw is keyed by (seed, output position) (draws.py)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshserve.engine import Engine, SamplingParams
from meshserve.engine.spec.layer_skip import write_layer_skip_draft

TARGET_PROMPT = [1] + [40, 41, 42, 43, 44] * 5  # repetitive: n-gram drafts get accepted
TARGET = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=10, ignore_eos=True, seed=1234)
BUDGETS = [5, 8, 16, 64]  # tokens per step; the engines are built for the largest


@pytest.fixture(scope="module")
def engines(tiny_model_dir, tmp_path_factory) -> dict[str, Engine]:
    path = tiny_model_dir("llama")
    draft = write_layer_skip_draft(path, tmp_path_factory.mktemp("crowd-draft"), 1)
    common = {
        "block_size": 4,
        "max_num_batched_tokens": max(BUDGETS),
        "max_num_seqs": 8,
        "max_model_len": 128,
    }
    specs = {
        "off": None,
        "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
        "draft": {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2},
    }
    return {name: Engine.from_args(str(path), speculative_config=s, **common) for name, s in specs.items()}


def run(engine: Engine, budget: int, crowd: list[tuple[list[int], SamplingParams]], at: int) -> list[int]:
    """The target request's tokens when it arrives ``at``-th among ``crowd``, ``budget`` tokens a step."""
    engine.scheduler.config.max_num_batched_tokens = budget
    arrivals = crowd[:at] + [(TARGET_PROMPT, TARGET)] + crowd[at:]
    ids = [engine.add_request(prompt, params) for prompt, params in arrivals]
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step()})
    return done[ids[at]]


NEIGHBOUR = st.tuples(
    st.lists(st.integers(3, 500), min_size=1, max_size=20),
    st.builds(
        SamplingParams,
        temperature=st.sampled_from([0.0, 0.7, 1.0]),
        max_tokens=st.integers(1, 12),
        seed=st.one_of(st.none(), st.integers(0, 99)),
        ignore_eos=st.just(True),
    ),
)


@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=st.sampled_from(["off", "ngram", "draft"]),
    budget=st.sampled_from(BUDGETS),
    crowd=st.lists(NEIGHBOUR, max_size=6),
    at=st.integers(0, 6),
)
def test_seeded_tokens_ignore_crowd_speculation_and_budget(engines, spec, budget, crowd, at):
    alone = run(engines["off"], max(BUDGETS), [], 0)
    assert run(engines[spec], budget, crowd, min(at, len(crowd))) == alone


def test_the_same_request_beside_six_others_with_speculation(engines):
    """The issue's case: alone, the draft model speculates; beside 6 others it pauses (more than 4 run)."""
    crowd = [
        ([1, 7 + i, 9], SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)) for i in range(6)
    ]
    draft = engines["draft"]
    before = draft.spec.verify_steps
    alone = run(draft, 64, [], 0)
    assert draft.spec.verify_steps > before  # drafts were verified alone
    assert run(draft, 64, crowd, 3) == alone == run(engines["off"], 64, [], 0)
