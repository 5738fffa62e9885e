"""Streaming deltas, n > 1 completions sharing the prompt's blocks, and the sampling extras end to end."""

from __future__ import annotations

import pytest

from meshserve import LLM, SamplingParams
from meshserve.engine import Engine

PROMPT = [1] + list(range(60, 85))  # 26 tokens: six full blocks of 4 and a partial one


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def run(engine: Engine) -> list:
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


def test_streamed_deltas_add_up_to_the_final_output(llama):
    engine = Engine.from_args(llama, block_size=4, max_num_batched_tokens=64, max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    final_id = engine.add_request(PROMPT, params)
    engine.add_request(PROMPT, params, request_id="s", stream=True)
    outs = run(engine)
    deltas = [o for o in outs if o.request_id == "s"]
    (final,) = [o for o in outs if o.request_id == final_id]
    assert len(deltas) == 12 and [o.finished for o in deltas] == [False] * 11 + [True]
    assert sum((o.outputs[0].token_ids for o in deltas), []) == final.token_ids
    assert "".join(o.outputs[0].text for o in deltas) == final.text
    assert sum((o.outputs[0].logprobs for o in deltas), []) == final.outputs[0].logprobs


def test_streamed_text_never_shows_a_stop_string(llama):
    engine = Engine.from_args(llama, max_model_len=128)
    (free,) = [
        o.text
        for o in LLM(llama, max_model_len=128).generate(
            PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
        )
    ]
    stop = free[6:9]
    engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=20, stop=stop), "s", stream=True)
    texts = [o.outputs[0].text for o in run(engine)]
    assert "".join(texts) == free[: free.index(stop)]


def test_n_completions_share_the_prompt_blocks(llama):
    engine = Engine.from_args(llama, block_size=4, max_num_batched_tokens=64, max_model_len=128)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    engine.add_request(PROMPT, params, request_id="p")
    engine.step()  # the first completion's prompt: 26 tokens computed
    engine.step()  # the other two join: the 6 full blocks come from the cache, only the rest is computed
    assert engine.last_stats["tokens"]["prefill"] == 2 * (len(PROMPT) - 24)
    (out,) = run(engine)
    assert [c.index for c in out.outputs] == [0, 1, 2] and all(len(c.token_ids) == 10 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = LLM(llama, block_size=4, max_model_len=128).generate(PROMPT, params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]  # seeded: reproducible
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_abort_of_an_n_request_frees_every_completion(llama):
    engine = Engine.from_args(llama, block_size=4, max_model_len=128)
    engine.add_request(PROMPT, SamplingParams(n=4, max_tokens=50), request_id="p")
    for _ in range(3):
        engine.step()
    assert engine.abort("p") and not engine.has_unfinished() and not engine.requests
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_penalties_bias_and_min_tokens_change_the_output(llama):
    llm = LLM(llama, max_model_len=128)
    base = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = llm.generate(PROMPT, base, use_tqdm=False)[0].token_ids
    biased = llm.generate(
        PROMPT,
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logit_bias={300: 100}),
        use_tqdm=False,
    )[0].token_ids
    assert biased == [300] * 16
    rep = llm.generate(
        PROMPT,
        SamplingParams(
            temperature=0, max_tokens=16, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0
        ),
        use_tqdm=False,
    )
    assert rep[0].token_ids != plain and len(set(rep[0].token_ids)) >= len(set(plain))
    eos = llm.engine.model_config.eos_token_ids[0]
    early = SamplingParams(temperature=0, max_tokens=8, logit_bias={eos: 100}, min_tokens=5)
    out = llm.generate(PROMPT, early, use_tqdm=False)[0]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == eos and out.finish_reason == "stop"


def test_a_finished_request_publishes_its_last_blocks_for_the_next_turn(llama):
    engine = Engine.from_args(llama, block_size=4, max_model_len=128)
    # 26 + 7 tokens: the finishing step completes the KV of block 8 (tokens 28..31)
    engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), "turn1")
    (first,) = run(engine)
    follow_up = PROMPT + first.token_ids + [5, 6, 7]
    engine.add_request(follow_up, SamplingParams(temperature=0, max_tokens=1), "turn2")
    engine.step()
    assert engine.last_stats["tokens"]["prefill"] == len(follow_up) - 32


@pytest.mark.parametrize("spec", [None, {"method": "ngram", "num_speculative_tokens": 3}])
def test_seeded_request_ignores_its_neighbours_with_and_without_spec(llama, spec):
    seeded = SamplingParams(temperature=0.8, seed=11, max_tokens=24, ignore_eos=True)
    prompt = [1] + [40, 41, 42, 43] * 5

    def tokens(neighbours: list[SamplingParams]) -> list[int]:
        llm = LLM(llama, max_model_len=128, speculative_config=spec)
        prompts = [prompt] + [[1, 9 + i] * 6 for i in range(len(neighbours))]
        return llm.generate(prompts, [seeded, *neighbours], use_tqdm=False)[0].token_ids

    busy = [
        SamplingParams(top_p=0.5, max_tokens=30),
        SamplingParams(temperature=0, max_tokens=5),
        SamplingParams(top_k=3, min_p=0.1, seed=1, max_tokens=40),
        SamplingParams(max_tokens=9),
    ]
    assert tokens(busy) == tokens([])


def test_verify_leaves_budget_for_every_decode(llama):
    """Budget 6 for 4 generating requests with 3 drafts each: drafts shrink, nobody waits a step."""
    engine = Engine.from_args(
        llama,
        max_num_batched_tokens=6,
        max_num_seqs=4,
        max_model_len=128,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3},
    )
    for i in range(4):
        engine.add_request(
            [1] + [30 + i, 31 + i] * 2, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        )
    while any(r.num_output_tokens == 0 for r in engine.requests.values()):
        engine.step()
    for _ in range(10):
        before = {rid: r.num_output_tokens for rid, r in engine.requests.items()}
        engine.step()
        assert all(engine.requests[rid].num_output_tokens > n for rid, n in before.items())


def test_prompt_logprobs_match_transformers_in_chunks(llama):
    import torch
    from transformers import AutoModelForCausalLM

    llm = LLM(llama, max_model_len=128, max_num_batched_tokens=8, max_num_seqs=2)  # prompt in 4 chunks
    (out,) = llm.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3), use_tqdm=False
    )
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(llama).float()
        logp = hf(torch.tensor([PROMPT])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    for position, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert PROMPT[position] in entry and len(entry) <= 4
        expected = logp[position - 1, PROMPT[position]].item()
        assert abs(entry[PROMPT[position]] - expected) < 1e-3
    assert (
        out.token_ids
        == llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0].token_ids
    )
