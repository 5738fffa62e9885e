"""Every architecture family serves transformers' greedy tokens exactly through the whole engine: prefix
caching on (the second round of requests reuses cached blocks), n-gram speculation on, a token budget that
chunks prompts in pieces longer than the sliding windows, and mixed prompt lengths in one batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from meshserve.engine import LLM, SamplingParams

# (make_tiny_model arch, config overrides). Windows shorter than the prompts and the 32-token budget.
CASES = {
    "llama3": ("llama3", {}),
    "mistral_window": ("mistral", {"sliding_window": 6}),
    "qwen3": ("qwen3", {}),
    "qwen3_window": ("qwen3", {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 1}),
    "gemma2": ("gemma2", {"sliding_window": 5}),
    "gemma3": ("gemma3", {"sliding_window": 6}),
    "phi3": ("phi3", {"original_max_position_embeddings": 1000, "sliding_window": 11}),
    "olmoe": ("olmoe", {"clip_qkv": 0.9}),
    "granitemoe": ("granitemoe", {}),
}
SHARED = [1, 40, 41, 42, 43, 40, 41, 42, 43, 50, 51]  # a common prefix, repetitive so n-grams find drafts
TAILS = [[], [80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91]]
# A prompt holding every ordinary token of the tiny models' 512-token vocabulary (ids 3..511) once: whatever
# a model generates, n-gram lookup finds it earlier in the context and proposes drafts.
EVERY_TOKEN = [1] + torch.randperm(512 - 3, generator=torch.Generator().manual_seed(0)).add(3).tolist()
MAX_TOKENS = 8


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tiny_model_dir):
    arch, overrides = CASES[request.param]
    path = tiny_model_dir(arch, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    prompts = [SHARED + tail for tail in TAILS] + [EVERY_TOKEN]
    with torch.no_grad():
        expected = [
            hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]
    return path, prompts, expected


def test_greedy_matches_transformers_with_prefix_cache_and_speculation(case):
    path, prompts, expected = case
    llm = LLM(
        str(path),
        max_num_batched_tokens=32,
        max_num_seqs=3,
        block_size=4,
        max_model_len=len(EVERY_TOKEN) + MAX_TOKENS,
        enable_prefix_caching=True,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3},
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    for _ in range(2):  # the second round starts from the first round's cached blocks
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.token_ids for o in outputs] == expected
    engine = llm.engine
    assert engine.blocks.prefix_cache.hit_tokens > 0
    assert engine.spec.draft_tokens > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_longrope_matches_transformers_across_the_original_context(tiny_model_dir):
    """LongRoPE past original_max_position_embeddings (16 here), as transformers 5 does it: a prompt longer
    than that rotates the long way throughout, even prefilled in 8-token chunks; a shorter one that
    generation carries past it is recomputed with the long factors (transformers drops its cache there);
    with the prefix cache and n-gram drafts on, twice."""
    path = tiny_model_dir("phi3", original_max_position_embeddings=16)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    prompts = [SHARED, SHARED + TAILS[1], SHARED + SHARED, SHARED[:9]]  # 11, 23, 22 and 9 tokens
    with torch.no_grad():
        expected = [
            hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]
    llm = LLM(
        str(path),
        max_num_batched_tokens=8,
        max_model_len=64,
        block_size=4,
        enable_prefix_caching=True,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3},
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    for _ in range(2):
        assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    assert llm.engine.spec.draft_tokens > 0
