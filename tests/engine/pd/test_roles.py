"""Roles in one process: a prefill engine hands requests over after their first token, a decode engine
continues them; the tokens equal the mixed engine's, and every block comes back on both sides."""

from __future__ import annotations

import itertools

import pytest

from meshserve.engine import LLM, Engine, SamplingParams
from meshserve.engine.pd.local import move
from meshserve.errors import InputError
from tests.engine.pd.workload import ARGS, GREEDY, PROMPTS, mixed_tokens


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", num_hidden_layers=2))


def run_pair(
    prefill: Engine,
    decode: Engine,
    prompts: list[list[int]],
    params: SamplingParams,
    moved: list | None = None,
    roles: dict[int, str] | None = None,
) -> dict:
    """Step both engines until every prompt has finished. ``moved``: collects the blocks copied and the
    output tokens each moved request had; ``roles``: the prefill engine's role from a step on."""
    ids = [prefill.add_request(p, params) for p in prompts]
    done = {}
    for step in itertools.count():
        if len(done) == len(ids):
            return {i: done[i] for i in ids}
        if roles and step in roles:
            prefill.set_role(roles[step])
        for out in prefill.step():
            if out.finish_reason != "handoff":  # ended there: at its first token, or decoded while mixed
                done[out.request_id] = out
        outputs = [r.num_output_tokens for r in prefill.handoffs]
        copied = move(prefill, decode)
        if moved is not None:
            moved.append((copied, outputs))
        for out in decode.step():
            done[out.request_id] = out
    raise AssertionError("unreachable")


def test_prefill_then_decode_equals_mixed_and_frees_every_block(model):
    expected = mixed_tokens(model)
    prefill = Engine.from_args(model, role="prefill", **ARGS)
    decode = Engine.from_args(model, role="decode", **ARGS)
    moved: list[int] = []
    outs = run_pair(prefill, decode, PROMPTS, GREEDY, moved)
    assert [o.token_ids for o in outs.values()] == expected
    assert decode.last_stats.get("spec_acceptance_rate", 0) > 0  # drafts ran on the decode side
    assert decode.blocks.prefix_cache.stats()["hit_rate"] > 0  # shared prefixes were not sent again
    assert sum(c for c, _ in moved) < sum(-(-len(p) // ARGS["block_size"]) for p in PROMPTS)
    for engine in (prefill, decode):
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
        assert not engine.handoffs and not engine.has_unfinished()


def test_the_decode_engine_adopts_no_more_than_max_num_seqs(model):
    """Handed-off requests beyond the decode engine's max_num_seqs wait on the prefill side (they once all
    joined: a batch of 6 under max_num_seqs=4 turned speculation off by disable_by_batch_size)."""
    prefill = Engine.from_args(model, role="prefill", **ARGS)
    decode = Engine.from_args(model, role="decode", **ARGS)
    for p in PROMPTS:
        prefill.add_request(p, GREEDY)
    most = 0
    while prefill.has_unfinished() or prefill.handoffs or decode.has_unfinished():
        prefill.step()
        move(prefill, decode)
        most = max(most, len(decode.scheduler.running))
        decode.step()
    assert most == ARGS["max_num_seqs"] < len(PROMPTS)
    assert decode.blocks.num_free_blocks == decode.blocks.num_blocks


def test_switching_roles_mid_run_hands_in_flight_requests_over_and_keeps_tokens(model):
    """The prefill engine turns mixed (requests decode there), then prefill again: each request it decodes
    is handed over mid-decode after its next token, with all its KV; the tokens never change."""
    expected = mixed_tokens(model)
    prefill = Engine.from_args(model, role="prefill", **ARGS)
    decode = Engine.from_args(model, role="decode", **ARGS)
    moved: list[int] = []
    outs = run_pair(prefill, decode, PROMPTS, GREEDY, moved, roles={1: "mixed", 8: "prefill"})
    assert [o.token_ids for o in outs.values()] == expected
    assert max(n for _, outputs in moved for n in outputs) > 1  # handed over mid-decode
    for engine in (prefill, decode):
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_seeded_sampling_and_logprobs_continue_as_in_mixed(model):
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=8, logprobs=2, ignore_eos=True)
    with LLM(model, **ARGS) as llm:
        mixed = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    prefill = Engine.from_args(model, role="prefill", **ARGS)
    decode = Engine.from_args(model, role="decode", **ARGS)
    outs = list(run_pair(prefill, decode, PROMPTS[:3], params).values())
    assert [o.token_ids for o in outs] == [o.token_ids for o in mixed]
    for ours, theirs in zip(outs, mixed, strict=True):
        assert [sorted(d) for d in ours.outputs[0].logprobs] == [
            sorted(d) for d in theirs.outputs[0].logprobs
        ]


def test_a_stop_at_the_first_token_ends_on_the_prefill_side(model):
    prefill = Engine.from_args(model, role="prefill", **ARGS)
    decode = Engine.from_args(model, role="decode", **ARGS)
    outs = run_pair(prefill, decode, PROMPTS[:2], SamplingParams(temperature=0, max_tokens=1))
    assert [o.finish_reason for o in outs.values()] == ["length", "length"]
    assert decode.num_steps == 0


def test_offline_prefill_engine_returns_first_tokens(model):
    with LLM(model, role="prefill", **ARGS) as llm:
        outs = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
        assert [o.finish_reason for o in outs] == ["handoff", "handoff"]
        assert [len(o.token_ids) for o in outs] == [1, 1]
        assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_a_prefill_engine_hands_each_of_n_completions_off_on_its_own(model):
    """n = 3 with the prefix cache: the first completion's prompt KV is shared by the others (as mixed), and
    each is handed off after its own first token, seeded as the mixed engine seeds it."""
    params = SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=8, ignore_eos=True)
    with LLM(model, **ARGS) as llm:
        mixed = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]
    prefill = Engine.from_args(model, role="prefill", **ARGS)
    prefill.add_request(PROMPTS[0], params, "r")
    while prefill.has_unfinished():
        prefill.step()
    assert [(r.request_id, r.index) for r in prefill.handoffs] == [("0_r", 0), ("1_r", 1), ("2_r", 2)]
    assert [r.output_token_ids for r in prefill.handoffs] == [c.token_ids[:1] for c in mixed.outputs]
    assert prefill.blocks.prefix_cache.stats()["hit_rate"] > 0  # the prompt was computed once


def test_bad_role_is_named(model):
    with pytest.raises(InputError, match="role"):
        Engine.from_args(model, role="both", **ARGS)
    mixed = Engine.from_args(model, **ARGS)
    with pytest.raises(InputError, match="role"):
        mixed.set_role("both")
    with pytest.raises(InputError, match="pd"):
        LLM(model, pd="prefill=1,decode=1", data_parallel_size=2, **ARGS)
