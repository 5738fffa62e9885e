"""Greedy output equals transformers' generate token for token, for every architecture, however the
engine batches: mixed prompt lengths in one batch, a small budget that chunks prefills, and a KV
cache so small that requests get preempted and recomputed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from meshserve.engine import LLM, SamplingParams

ARCHS = ["llama", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe"]
PROMPT_LENGTHS = [1, 7, 23, 40, 3, 61]
MAX_TOKENS = 10
SETTINGS = {
    "one_batch": {"max_num_batched_tokens": 512, "max_num_seqs": 8},
    "small_chunks": {"max_num_batched_tokens": 9, "max_num_seqs": 4, "block_size": 4},
    "preemption": {
        "max_num_batched_tokens": 32,
        "max_num_seqs": 6,
        "block_size": 4,
        "num_kv_blocks": 20,
        "max_model_len": 80,
    },
}


def prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [[1] + torch.randint(3, vocab_size, (n - 1,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tiny_model_dir):
    """A model directory, its prompts and transformers' greedy continuations (one prompt at a time)."""
    path = tiny_model_dir(request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    batch = prompts(hf.config.vocab_size)
    expected = []
    with torch.no_grad():
        for p in batch:
            out = hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
            expected.append(out[0, len(p) :].tolist())
    return path, batch, expected


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_matches_transformers(case, setting):
    path, batch, expected = case
    llm = LLM(str(path), **SETTINGS[setting])
    outputs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [o.token_ids for o in outputs] == expected
    engine = llm.engine
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    if setting == "preemption":
        assert engine.num_preemptions > 0
    if setting == "small_chunks":
        assert engine.num_steps > sum(PROMPT_LENGTHS) // 9


@pytest.fixture(scope="module")
def llama_case(tiny_model_dir):
    path = tiny_model_dir("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    batch = prompts(hf.config.vocab_size)
    with torch.no_grad():
        expected = [
            hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)[
                0, len(p) :
            ].tolist()
            for p in batch
        ]
    return path, batch, expected


@settings(max_examples=12, deadline=None)
@given(
    budget=st.integers(6, 80),
    block_size=st.sampled_from([1, 2, 4, 16]),
    spare_blocks=st.integers(0, 40),
    order=st.permutations(range(len(PROMPT_LENGTHS))),
    prefix_caching=st.booleans(),
)
def test_greedy_is_the_same_whatever_the_schedule(
    llama_case, budget, block_size, spare_blocks, order, prefix_caching
):
    """Any budget, block size, cache size (down to one request's worth) and arrival order."""
    path, batch, expected = llama_case
    max_model_len = 80
    blocks = -(-max_model_len // block_size) + spare_blocks
    llm = LLM(
        str(path),
        max_num_batched_tokens=budget,
        max_num_seqs=min(budget, 5),
        block_size=block_size,
        num_kv_blocks=blocks,
        max_model_len=max_model_len,
        enable_prefix_caching=prefix_caching,
    )
    outputs = llm.generate(
        [batch[i] for i in order], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False
    )
    assert [o.token_ids for o in outputs] == [expected[i] for i in order]
    assert llm.engine.blocks.num_free_blocks == blocks
