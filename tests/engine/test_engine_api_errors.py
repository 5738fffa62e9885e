"""The Python door: bad engine arguments and bad prompts raise InputError naming the field, and a failed
``generate`` leaves the engine exactly as it was - the good requests of the same batch, run again, get
the same tokens as when run alone."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshserve.config import EngineConfig
from meshserve.engine import LLM, SamplingParams
from meshserve.engine.sampling_params import MAX_CHOICES
from meshserve.errors import InputError

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Values of the wrong type for every engine argument: nothing here may be coerced silently.
WRONG = st.sampled_from(["8", "", None, True, False, 2.5, math.nan, math.inf, -math.inf, [], {}, b"1"])
INT_ARGS = ("block_size", "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs", "max_model_len", "seed")
FLOAT_ARGS = ("kv_cache_memory", "kv_cache_fraction")


@FAST
@given(name=st.sampled_from(INT_ARGS + FLOAT_ARGS + ("enable_prefix_caching", "dtype")), value=WRONG)
def test_wrongly_typed_engine_arguments_name_the_field(name, value):
    if value is None and name in ("num_kv_blocks", "max_num_seqs", "max_model_len", "kv_cache_memory"):
        return  # None is these arguments' documented default
    if isinstance(value, float) and math.isfinite(value) and name == "kv_cache_memory":
        return  # 2.5 GiB is a fine size (checked against the machine once the model is known)
    if isinstance(value, bool) and name == "enable_prefix_caching":
        return
    with pytest.raises(InputError) as err:
        EngineConfig.from_args("some/model", **{name: value})
    assert err.value.field == name


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("block_size", 3, "power of two"),
        ("block_size", 256, "[1, 128]"),
        ("max_num_batched_tokens", 0, "[1, 16777216]"),
        ("max_model_len", 1, "[2,"),
        ("seed", -1, "[0, 18446744073709551615]"),
        ("seed", 2**64, "[0, 18446744073709551615]"),
        ("kv_cache_fraction", 0.95, "(0, 0.9]"),
        ("kv_cache_memory", 0, "> 0"),
        ("record_expert_trace", "trace.json", ".npz"),
    ],
)
def test_out_of_range_engine_arguments_state_the_allowed_range(name, value, allowed):
    with pytest.raises(InputError) as err:
        EngineConfig.from_args("some/model", **{name: value})
    assert err.value.field == name and allowed in err.value.message


@pytest.mark.parametrize("name", ["num_kv_blocks", "kv_cache_memory"])
def test_a_kv_cache_larger_than_the_machine_is_refused_before_allocating(tiny_model_dir, name):
    huge = {"num_kv_blocks": 10**12, "kv_cache_memory": 10.0**9}[name]
    with pytest.raises(InputError) as err:
        LLM(str(tiny_model_dir("llama")), **{name: huge})
    assert err.value.field == name and "available" in err.value.message


def test_an_unwritable_trace_path_fails_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError) as err:
        EngineConfig.from_args("m", record_expert_trace=str(blocker / "trace.npz"))
    assert err.value.field == "record_expert_trace"


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(str(tiny_model_dir("llama")), num_kv_blocks=64, block_size=4, max_model_len=128) as llm:
        yield llm


GOOD = ["hello world", [5, 6, 7, 8], {"prompt": "the sky is"}, {"prompt_token_ids": [9, 10, 11]}]
BAD_PROMPTS = st.one_of(
    st.integers(),
    st.floats(),
    st.none(),
    st.just(""),
    st.just([]),
    st.just([1.5, 2]),
    st.just([True]),
    st.just([-1]),
    st.just([10**6]),
    st.just({"prompt": 5}),
    st.just({"text": "hi"}),
    st.just({"prompt": "a", "prompt_token_ids": [1]}),
    st.just(b"bytes"),
    st.just(("a", 1)),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
)


@pytest.fixture(scope="module")
def alone(llm):
    """Each good prompt's greedy tokens when it runs by itself."""
    return [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in GOOD]


def assert_nothing_left(llm):
    """No request known, none queued, every KV block back (cached prefix blocks count as free)."""
    assert not llm.engine.requests and not llm.engine.has_unfinished()
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


@FAST
@given(bad=BAD_PROMPTS, where=st.integers(0, len(GOOD)))
def test_one_bad_prompt_fails_the_call_and_leaves_nothing_behind(llm, alone, bad, where):
    batch = [*GOOD[:where], bad, *GOOD[where:]]
    with pytest.raises(InputError) as err:
        llm.generate(batch, GREEDY, use_tqdm=False)
    assert err.value.field in ("prompt", "prompts", f"prompts[{where}]")
    assert_nothing_left(llm)
    outs = llm.generate(GOOD, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone


def test_an_interrupt_while_adding_takes_back_the_requests_of_that_call(llm, alone, monkeypatch):
    added = []
    real_add = llm.engine.add_request

    def add_then_interrupt(prompt, params=None, request_id=None):
        if len(added) == 2:
            raise KeyboardInterrupt
        added.append(real_add(prompt, params, request_id))
        return added[-1]

    monkeypatch.setattr(llm.engine, "add_request", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(GOOD, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert len(added) == 2
    assert_nothing_left(llm)
    assert [o.outputs[0].token_ids for o in llm.generate(GOOD, GREEDY, use_tqdm=False)] == alone


def test_an_interrupt_mid_run_aborts_that_calls_requests(llm, alone, monkeypatch):
    real_step = llm.engine.step
    steps = []

    def step_then_interrupt():
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(llm.engine, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(GOOD, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert_nothing_left(llm)
    assert [o.outputs[0].token_ids for o in llm.generate(GOOD, GREEDY, use_tqdm=False)] == alone


def test_generate_after_close_is_an_error(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), num_kv_blocks=16, block_size=4, max_model_len=64)
    llm.close()
    with pytest.raises(InputError) as err:
        llm.generate("hello", GREEDY, use_tqdm=False)
    assert err.value.field == "engine" and "closed" in err.value.message


@pytest.mark.parametrize("params", [5, "greedy", [GREEDY, "x"], [GREEDY]])
def test_bad_sampling_params_name_the_field_and_leave_nothing(llm, params):
    with pytest.raises(InputError) as err:
        llm.generate(["hello world", "the sky is"], params, use_tqdm=False)
    assert err.value.field == "sampling_params"
    assert_nothing_left(llm)


def test_a_call_serves_any_number_of_prompts_with_at_most_max_choices_completions_in_the_engine(llm, alone):
    """vLLM's offline batch: every prompt is served, but a call keeps at most MAX_CHOICES completions
    (prompts x n, the bound of one HTTP request) in the engine at once."""
    in_engine: list[int] = []
    add = llm.engine.add_request
    live: dict[str, int] = {}

    def counting_add(prompt, params):
        request_id = add(prompt, params)
        live[request_id] = params.n
        in_engine.append(sum(live.values()))
        return request_id

    step = llm.engine.step

    def counting_step():
        outs = step()
        for out in outs:
            live.pop(out.request_id, None)
        return outs

    wide = SamplingParams(n=MAX_CHOICES // 4, max_tokens=1)
    llm.engine.add_request, llm.engine.step = counting_add, counting_step
    try:
        outs = llm.generate(["hi"] * 5, [wide] * 4 + [GREEDY], use_tqdm=False)
        assert [len(o.outputs) for o in outs] == [wide.n] * 4 + [1]
        many = llm.generate(["hi"] * (MAX_CHOICES + 3), SamplingParams(max_tokens=1), use_tqdm=False)
        assert len(many) == MAX_CHOICES + 3 and all(len(o.outputs[0].token_ids) == 1 for o in many)
    finally:
        llm.engine.add_request, llm.engine.step = add, step
    assert max(in_engine) <= MAX_CHOICES
    assert_nothing_left(llm)
    assert [o.outputs[0].token_ids for o in llm.generate(GOOD, GREEDY, use_tqdm=False)] == alone
