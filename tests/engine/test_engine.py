"""Engine and LLM behaviour: stop conditions, seeded sampling, abort, bad input, expert traces."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from meshserve.engine import LLM, Engine, SamplingParams
from meshserve.errors import InputError
from meshserve.traces import ExpertTrace

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [[1, 40, 41, 42], [1] + list(range(50, 80)), [1, 7], [1] + list(range(100, 117))]


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llm(llama):
    return LLM(str(llama), max_num_batched_tokens=16, max_num_seqs=4, block_size=4, max_model_len=128)


def greedy_tokens(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_outputs_carry_text_reasons_and_timings(llm):
    (out,) = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert out.prompt == "hello world" and out.prompt_token_ids[0] == 1  # BOS added by the tokenizer
    assert (
        len(out.token_ids) == 5 and out.finish_reason == "length" and out.outputs[0].finish_reason == "length"
    )
    assert out.text == llm.tokenizer.decode(out.token_ids)
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.finish_time


def test_stop_token_ids_and_stop_strings(llm):
    (full,) = greedy_tokens(llm, [PROMPTS[1]])
    stop_id = full[5]
    (out,) = llm.generate(
        [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]), use_tqdm=False
    )
    assert out.token_ids == full[: full.index(stop_id) + 1] and out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop_id
    assert out.text == llm.tokenizer.decode(out.token_ids[:-1])

    text = llm.tokenizer.decode(full)
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].isascii())
    (out,) = llm.generate(
        [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=24, stop=["\x00never", stop]), use_tqdm=False
    )
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.text == text[: text.index(stop)]
    assert out.token_ids == full[: len(out.token_ids)]


def test_eos_ends_a_request_unless_ignored(llama, tmp_path, llm):
    (full,) = greedy_tokens(llm, [PROMPTS[0]])
    eos = full[4]
    model = tmp_path / "model"
    shutil.copytree(llama, model)
    (model / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": eos}))
    other = LLM(str(model), max_model_len=128)
    (out,) = other.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert out.token_ids == full[: full.index(eos) + 1] and out.finish_reason == "stop"
    assert greedy_tokens(other, [PROMPTS[0]]) == [full]  # ignore_eos=True


def test_max_model_len_caps_generation(llm):
    prompt = [1] + [60] * 120
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=50), use_tqdm=False)
    assert len(out.token_ids) == 128 - 121 and out.finish_reason == "length"


def test_seeded_sampling_ignores_the_batch(llama, llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=7, ignore_eos=True)
    (alone,) = llm.generate([PROMPTS[1]], params, use_tqdm=False)
    other = LLM(str(llama), max_num_batched_tokens=64, max_num_seqs=8, seed=5)
    mixed = other.generate(
        PROMPTS + [PROMPTS[1]],
        [SamplingParams(temperature=1.0, max_tokens=20)] * 4 + [params],
        use_tqdm=False,
    )
    assert mixed[-1].token_ids == alone.token_ids
    assert (
        alone.token_ids
        != greedy_tokens(llm, [PROMPTS[1]], params=SamplingParams(temperature=0, max_tokens=16))[0]
    )


def test_logprobs_follow_each_token(llm):
    (out,) = llm.generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4, logprobs=3), use_tqdm=False
    )
    lps = out.outputs[0].logprobs
    assert len(lps) == 4
    for token, entry in zip(out.token_ids, lps, strict=True):
        assert len(entry) == 3 and max(entry, key=entry.get) == token and all(v <= 0 for v in entry.values())


def run_all(engine: Engine) -> dict[str, list[int]]:
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.token_ids for o in engine.step()})
    return done


def test_bad_request_mid_run_and_abort_leave_others_untouched(llm):
    expected = greedy_tokens(llm, PROMPTS)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    victim = engine.add_request([1] + list(range(200, 230)), GREEDY)
    for _ in range(3):
        engine.step()
    bad = [
        ([1] * 200, GREEDY, "prompt"),
        ([], GREEDY, "prompt"),
        ("", GREEDY, "prompt"),
        ([1, 10**6], GREEDY, "prompt"),
        ([1, 2], "greedy", "sampling_params"),
    ]
    for prompt, params, field in bad:
        with pytest.raises(InputError) as err:
            engine.add_request(prompt, params)
        assert err.value.field == field
    with pytest.raises(InputError, match="already in use"):
        engine.add_request([1, 2], GREEDY, request_id=ids[0])
    assert engine.abort(victim) and not engine.abort(victim)
    done = run_all(engine)
    assert [done[i] for i in ids] == expected and victim not in done
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_too_long_prompt_error_names_the_limit(llm):
    with pytest.raises(InputError) as err:
        llm.generate([[1] * 128], GREEDY, use_tqdm=False)
    assert err.value.field == "prompt" and "max_model_len=128" in err.value.message
    assert not llm.engine.has_unfinished()
    with pytest.raises(InputError):  # all or nothing: the good prompt before the bad one is withdrawn
        llm.generate([PROMPTS[0], [1] * 128], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished() and not llm.engine.requests


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda d: shutil.rmtree(d), "model"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
        (
            lambda d: (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]})),
            "config.json:architectures",
        ),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
    ],
)
def test_missing_or_corrupt_model_files(llama, tmp_path, make, field):
    model = tmp_path / "model"
    shutil.copytree(llama, model)
    make(model)
    with pytest.raises(InputError) as err:
        LLM(str(model))
    assert err.value.field == field


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 4, "max_num_seqs": 8}, "max_num_batched_tokens"),
        ({"block_size": 3}, "block_size"),
        ({"dtype": "float64"}, "dtype"),
        ({"max_model_len": 10**6}, "max_model_len"),
        ({"num_kv_blocks": 2}, "num_kv_blocks"),
        ({"max_num_sequences": 4}, "max_num_sequences"),
        ({"record_expert_trace": "x.npz"}, "record_expert_trace"),
    ],
)
def test_bad_engine_arguments(llama, args, field):
    with pytest.raises(InputError) as err:
        LLM(str(llama), **args)
    assert err.value.field == field


def test_moe_engine_records_an_expert_trace(tiny_model_dir, tmp_path):
    path = tmp_path / "trace.npz"
    prompts = [[1] + list(range(10, 10 + n)) for n in (5, 30, 12)]
    # Prefix caching off: these prompts share a prefix, and cached tokens are not computed (nor routed).
    with LLM(
        str(tiny_model_dir("mixtral")),
        record_expert_trace=str(path),
        max_num_batched_tokens=16,
        enable_prefix_caching=False,
    ) as llm:
        outs = llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False
        )
        steps = llm.engine.num_steps
    trace = ExpertTrace.load(path)
    assert trace.counts.shape == (steps, 2, 4) and trace.top_k == 2 and trace.source == "engine"
    # Every token computed (prompt tokens, and each generated token but the last) is routed top_k times.
    tokens = sum(len(o.prompt_token_ids) + len(o.token_ids) - 1 for o in outs)
    assert np.all(trace.counts.sum(axis=(0, 2)) == tokens * 2)
    assert np.all(trace.tokens_per_step() <= 16)


def test_step_statistics_are_logged_at_debug(llm, caplog):
    with caplog.at_level("DEBUG", logger="meshserve.engine.engine"):
        # Prompts no other test used: earlier ones are in the prefix cache and would prefill less.
        llm.generate(
            [[1] + list(range(300, 330)), [1, 9, 10]],
            SamplingParams(temperature=0, max_tokens=3),
            use_tqdm=False,
        )
    lines = [r.getMessage() for r in caplog.records if "KV usage" in r.getMessage()]
    assert lines and "'prefill': 16" in lines[0] and "'decode'" in lines[0]
    stats = llm.engine.last_stats
    assert set(stats["tokens"]) == {"prefill", "decode", "verify"} and 0 <= stats["kv_usage"] <= 1


def test_abort_of_n_gt_1_before_its_first_sample_frees_all_and_the_id_is_reused(llm):
    """With prefix caching the n - 1 other completions are held (never queued) until the first has
    sampled: aborting mid-prompt must end them too, forget the request and free every block."""
    engine = llm.engine
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=4, ignore_eos=True)
    long_prompt = [1] + list(range(60, 100))  # 41 tokens: 3 chunks of the 16-token budget
    engine.add_request(long_prompt, params, request_id="x")
    engine.step()  # the first chunk only: nothing sampled, two completions still held
    assert engine.output("x").outputs[0].token_ids == []
    assert engine.abort("x") and "x" not in engine.groups and not engine.requests
    assert not engine.has_unfinished() and engine.blocks.num_free_blocks == engine.blocks.num_blocks
    engine.add_request(long_prompt, params, request_id="x")  # the id is free again
    (out,) = [o for o in run_all_outputs(engine) if o.request_id == "x"]
    assert [len(c.token_ids) for c in out.outputs] == [4, 4, 4]


def run_all_outputs(engine: Engine) -> list:
    done = []
    while engine.has_unfinished():
        done += engine.step()
    return done


def test_ctrl_c_before_the_first_sample_of_n_gt_1_takes_the_request_back(llm, monkeypatch):
    """LLM.generate's cleanup aborts what it added: here a group whose other completions are still held."""
    real_step, steps = llm.engine.step, []

    def step_then_interrupt():
        steps.append(1)
        if len(steps) == 2:  # the 41-token prompt is mid-prefill (16 tokens a step)
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(llm.engine, "step", step_then_interrupt)
    params = SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=4, ignore_eos=True)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1] + list(range(60, 100))], params, use_tqdm=False)
    monkeypatch.undo()
    engine = llm.engine
    assert not engine.groups and not engine.requests and not engine.has_unfinished()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
