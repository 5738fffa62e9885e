"""Automatic prefix caching inside the engine: token-granular reuse by copy-on-write, on by default."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from meshserve.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_partly_matching_block_is_reused_by_copy_on_write(tiny_model_dir):
    path = tiny_model_dir("llama")
    first = [1] + list(range(200, 219))  # 20 tokens: blocks of 8 -> [0:8] [8:16] full, [16:20] partial
    second = first[:13] + [5, 6, 7, 8]  # diverges inside the second block, after 13 matching tokens
    llm = LLM(str(path), block_size=8, max_num_seqs=4, max_num_batched_tokens=64)
    assert llm.engine.blocks.prefix_cache is not None  # on by default
    llm.generate([first], GREEDY, use_tqdm=False)
    cache = llm.engine.blocks.prefix_cache
    before = cache.hit_tokens
    (out,) = llm.generate([second], GREEDY, use_tqdm=False)
    assert cache.hit_tokens - before == 13  # one shared block + 5 tokens copied out of the next one
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf.generate(torch.tensor([second]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.token_ids == expected[0, len(second) :].tolist()


def test_cached_blocks_stay_resident_and_count_as_free(tiny_model_dir):
    llm = LLM(
        str(tiny_model_dir("llama")),
        block_size=4,
        max_num_seqs=2,
        max_num_batched_tokens=64,
        num_kv_blocks=40,
        max_model_len=64,
    )
    prompts = [[1] + list(range(300 + 40 * i, 330 + 40 * i)) for i in range(4)]  # 31 tokens = 8 blocks each
    llm.generate(prompts, GREEDY, use_tqdm=False)  # more than fits at once: cached blocks get evicted
    blocks = llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and blocks.prefix_cache.num_evictable > 0
    assert blocks.usage == 0.0
    # The last prompt is still cached: it is found again, all but its last token.
    llm.generate(prompts[-1:], GREEDY, use_tqdm=False)
    assert llm.engine.last_stats["prefix_hit_rate"] > 0


def test_prefix_caching_can_be_turned_off(tiny_model_dir):
    llm = LLM(
        str(tiny_model_dir("llama")), enable_prefix_caching=False, max_num_seqs=2, max_num_batched_tokens=64
    )
    llm.generate([[1, 2, 3] * 10] * 2, GREEDY, use_tqdm=False)
    assert llm.engine.blocks.prefix_cache is None and "prefix_hit_rate" not in llm.engine.last_stats
