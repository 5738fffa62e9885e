"""Numeric extremes of the sampling fields: every value either is refused naming the field, or samples
finite logits; a near-zero temperature is greedy; a request whose parameters still fail inside a step
ends alone (finish_reason "error") while the rest of its batch keeps its tokens and the engine serves on."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshserve.engine import LLM, SamplingParams
from meshserve.engine.sampling_params import (
    GREEDY_BELOW,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    REPETITION_PENALTY_RANGE,
)
from meshserve.errors import InputError

PROMPT = [1, 17, 42, 99, 7]
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Floats from the smallest subnormal to the largest double, both signs, and the special values.
EXTREME = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([5e-324, 1e-300, 1e-40, 1e-6, 1e-5, 1e30, 1e38, 3.5e38, 1e300, -0.0]),
)
FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("llama")), max_model_len=64, block_size=4, max_num_seqs=8)


def tokens(llm: LLM, params: SamplingParams) -> list[int]:
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    assert out.outputs[0].finish_reason != "error", out.outputs[0].error
    return out.outputs[0].token_ids


@FAST
@given(name=st.sampled_from(FLOAT_FIELDS), value=EXTREME, logprobs=st.sampled_from([None, 5]))
def test_every_float_is_refused_or_samples_finitely(llm, name, value, logprobs):
    try:
        params = SamplingParams(max_tokens=3, seed=1, ignore_eos=True, logprobs=logprobs, **{name: value})
    except InputError as err:
        assert err.field == name
        return
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    completion = out.outputs[0]
    assert completion.finish_reason == "length" and len(completion.token_ids) == 3
    for entry in completion.logprobs or []:
        assert all(not math.isnan(v) and v != math.inf for v in entry.values())


@pytest.mark.parametrize("temperature", [5e-324, 1e-40, 1e-20, GREEDY_BELOW / 2])
def test_a_temperature_below_1e_5_is_greedy(llm, temperature):
    greedy = tokens(llm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    tiny = tokens(llm, SamplingParams(temperature=temperature, max_tokens=8, ignore_eos=True, seed=3))
    assert tiny == greedy and set(greedy) != {0}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", MAX_TEMPERATURE * 2),
        ("top_k", MAX_TOP_K + 1),
        ("top_k", 1 << 70),
        ("repetition_penalty", REPETITION_PENALTY_RANGE[0] / 2),
        ("repetition_penalty", REPETITION_PENALTY_RANGE[1] * 2),
        ("stop", ["x"] * (MAX_STOP + 1)),
        ("stop", "x" * (MAX_STOP_CHARS + 1)),
        ("stop_token_ids", [3] * (MAX_STOP_TOKEN_IDS + 1)),
        ("logit_bias", {str(i): 1 for i in range(MAX_LOGIT_BIAS_ENTRIES + 1)}),
    ],
)
def test_values_past_the_bounds_are_refused_naming_the_field(field, value):
    with pytest.raises(InputError) as err:
        SamplingParams(**{field: value})
    assert err.value.field == field


@pytest.mark.parametrize("field", ["temperature", "top_k", "repetition_penalty"])
def test_the_bounds_themselves_sample(llm, field):
    value = {"temperature": MAX_TEMPERATURE, "top_k": MAX_TOP_K, "repetition_penalty": None}[field]
    for v in [value] if value is not None else REPETITION_PENALTY_RANGE:
        assert len(tokens(llm, SamplingParams(max_tokens=3, ignore_eos=True, seed=2, **{field: v}))) == 3


def test_stop_token_ids_outside_the_vocabulary_are_refused(llm):
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(InputError) as err:
        llm.generate([PROMPT], SamplingParams(stop_token_ids=[vocab]), use_tqdm=False)
    assert err.value.field == "stop_token_ids" and str(vocab - 1) in str(err.value)


@pytest.mark.parametrize(
    "bad", [{"top_k": 1 << 70}, {"temperature": math.nan}, {"repetition_penalty": 1e-45}]
)
def test_a_request_that_fails_in_the_step_ends_alone(llm, bad):
    """Parameters changed after validation (as a value the checks miss would be) fail only their request."""
    good = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = tokens(llm, good)
    broken = SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True, seed=1)
    for name, value in bad.items():
        setattr(broken, name, value)
    outs = llm.generate([PROMPT, PROMPT[:3], PROMPT], [good, broken, good], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[::2]] == [alone, alone]
    failed = outs[1].outputs[0]
    assert failed.finish_reason == "error" and failed.error and "sampling failed" in failed.error
    blocks = llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not llm.engine.has_unfinished()
    assert tokens(llm, good) == alone  # the engine serves on


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token(llm):
    """5e-324 is 0 in float32: the filter once dropped every token and the row had nothing to sample."""
    greedy = tokens(llm, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert tokens(llm, SamplingParams(top_p=5e-324, max_tokens=5, ignore_eos=True, seed=4)) == greedy


def test_a_request_that_fails_in_a_verify_ends_alone(tiny_model_dir):
    """The same rule for speculative verify work: drafts of a broken request fail only that request."""
    spec = {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_min": 1,
        "disable_by_batch_size": None,
    }
    llm = LLM(str(tiny_model_dir("llama")), max_model_len=64, block_size=4, speculative_config=spec)
    repetitive = [1] + [7, 8, 9] * 5
    good = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = tokens_of(llm, repetitive, good)
    engine = llm.engine
    engine.add_request(repetitive, good, "good")
    # top_k=2: its sampled tokens repeat, so n-gram lookup drafts for it whatever the draws
    broken = SamplingParams(temperature=0.8, top_k=2, max_tokens=20, ignore_eos=True, seed=1)
    engine.add_request(repetitive, broken, "broken")
    propose = engine.spec.propose

    def propose_then_break(*args):
        propose(*args)
        bad = engine.requests.get("broken")
        if bad is not None and bad.spec_token_ids:
            broken.top_k = 1 << 70  # as a value the checks miss would: it overflows in the verify

    engine.spec.propose = propose_then_break
    outputs = {}
    while engine.has_unfinished():
        outputs.update({o.request_id: o for o in engine.step()})
    assert broken.top_k == 1 << 70, "the broken request never had drafts; the test would not cover verify"
    assert outputs["broken"].outputs[0].finish_reason == "error"
    assert outputs["good"].outputs[0].token_ids == alone and engine.spec.stats()["spec_acceptance_rate"] > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def tokens_of(llm: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    (out,) = llm.generate([prompt], params, use_tqdm=False)
    return out.outputs[0].token_ids
