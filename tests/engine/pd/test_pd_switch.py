"""Live role switches of a running prefill/decode pair: both instances turn mixed mid-run (prompts then go
to either), then back; streamed tokens equal the mixed engine's, and no block is left held."""

from __future__ import annotations

import time

import pytest

from meshserve.config import EngineConfig
from meshserve.engine.pd.frontend import PDEngine
from meshserve.engine.pd.policy import RolePolicy
from meshserve.errors import InputError
from tests.engine.pd.test_pd_processes import assert_no_blocks_held, settled
from tests.engine.pd.workload import ARGS, GREEDY, PROMPTS, mixed_tokens


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", num_hidden_layers=2))


def test_switching_both_instances_mid_run_keeps_every_token(model):
    expected = mixed_tokens(model)
    with PDEngine(EngineConfig.from_args(model, **ARGS)) as pd:
        ids = [pd.add_request(p, GREEDY, stream=True) for p in PROMPTS[:3]]
        tokens: dict[str, list[int]] = {}
        deltas, deadline = 0, time.monotonic() + 120
        while len(ids) < len(PROMPTS) or pd.has_unfinished():
            assert time.monotonic() < deadline
            for out in pd.step():
                tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
                deltas += 1
            if deltas >= 3 and len(ids) == 3:  # mid-run: both mixed, more prompts (routed to either)
                pd.set_role("prefill", "mixed")
                pd.set_role("decode", "mixed")
                ids += [pd.add_request(p, GREEDY, stream=True) for p in PROMPTS[3:]]
            if deltas >= 20 and pd.roles["prefill"] == "mixed":  # back: in-flight requests move over
                pd.set_role("prefill", "prefill")
                pd.set_role("decode", "decode")
        assert [tokens[i] for i in ids] == expected
        assert [(i, r) for _, i, r in pd.switches] == [
            ("prefill", "mixed"),
            ("decode", "mixed"),
            ("prefill", "prefill"),
            ("decode", "decode"),
        ]
        assert_no_blocks_held(settled(pd))


def test_only_the_roles_a_pair_can_take_are_allowed(model):
    with PDEngine(EngineConfig.from_args(model, **ARGS)) as pd:
        with pytest.raises(InputError, match="role"):
            pd.set_role("prefill", "decode")
        with pytest.raises(InputError, match="instance"):
            pd.set_role("third", "mixed")


def test_policy_switches_with_hysteresis():
    policy = RolePolicy(high=4, low=1)
    roles = {"prefill": "prefill", "decode": "decode"}

    def stats(queue: int, batch: int) -> dict:
        return {"prefill": {"waiting": queue}, "decode": {"running": batch}}

    assert policy.decide(roles, stats(0, 4)) == {"prefill": "mixed"}  # decode-heavy
    assert policy.decide(roles, stats(5, 0)) == {"decode": "mixed"}  # prompt-heavy
    assert policy.decide(roles, stats(2, 3)) == {}  # between the thresholds: nothing moves
    mixed = {"prefill": "mixed", "decode": "decode"}
    assert policy.decide(mixed, stats(0, 2)) == {}  # not back until the batch is <= low
    assert policy.decide(mixed, stats(0, 1)) == {"prefill": "prefill"}
    with pytest.raises(InputError, match="low < high"):
        RolePolicy(high=2, low=2)


def test_policy_with_several_instances_of_a_role_judges_each_on_its_own_queue():
    policy = RolePolicy(high=4, low=1)
    kinds = {"prefill0": "prefill", "prefill1": "prefill", "decode": "decode"}
    roles = dict(kinds)
    stats = {"prefill0": {"waiting": 0}, "prefill1": {"waiting": 3}, "decode": {"running": 5}}
    assert policy.decide(roles, stats, kinds) == {"prefill0": "mixed"}  # prefill1 still has a queue
    stats["prefill1"]["waiting"] = 5  # prompt-heavy on one prefill instance is enough to ...
    stats["decode"]["running"] = 0
    assert policy.decide(roles, stats, kinds) == {"decode": "mixed"}  # ... let the decode one take prompts
