"""meshserve's models compute what transformers computes, for every architecture, however batches are cut."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from meshserve.models import load_model
from meshserve.testing import PagedSequences

# Every architecture, plus Qwen MoE variants with dense layers mixed in (HF's two rules for them).
CASES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {"num_hidden_layers": 3, "decoder_sparse_step": 2}),
    "qwen3_moe": ("qwen3_moe", {"num_hidden_layers": 3, "mlp_only_layers": [0]}),
    # Windows shorter than the prompts: Mixtral slides in every layer, Qwen2 from max_window_layers on.
    "mixtral_window": ("mixtral", {"sliding_window": 5}),
    "qwen2_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 1}),
    # The families of tests/models/test_arch_engine.py, logits row by row (windows of 8 in Gemma's sliding
    # layers; Phi-3's prompts stay within its 32-token original context, decodes reach it).
    "qwen3": ("qwen3", {}),
    "mistral_window": ("mistral", {"sliding_window": 5}),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", {}),
    "phi3": ("phi3", {}),
    "olmoe_clip": ("olmoe", {"clip_qkv": 0.9}),
    "granitemoe": ("granitemoe", {}),
    "llama_tied_rope": (
        "llama",
        {
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
}
PROMPT_LENGTHS = [1, 6, 13, 29]
ATOL = 1e-4


@pytest.fixture(scope="module", params=list(CASES))
def models(request, tiny_model_dir):
    arch, overrides = CASES[request.param]
    path = tiny_model_dir(arch, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    return load_model(path), hf


def prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [[1] + torch.randint(3, vocab_size, (n - 1,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def test_one_flat_batch_matches_transformers(models):
    lm, hf = models
    seqs = PagedSequences(lm)
    batch = prompts(lm.config.vocab_size)
    ids = [seqs.add(p) for p in batch]
    logits = seqs.step({i: len(p) for i, p in zip(ids, batch, strict=True)})
    for i, p in zip(ids, batch, strict=True):
        torch.testing.assert_close(logits[i], hf_logits(hf, p), atol=ATOL, rtol=0)


def test_chunked_prefill_then_greedy_decode_matches_transformers(models):
    """A 7-token budget per step: prompts prefill in chunks across steps while earlier ones decode."""
    lm, hf = models
    seqs = PagedSequences(lm, block_size=4)
    batch = prompts(lm.config.vocab_size)
    ids = [seqs.add(p) for p in batch]
    new_tokens = 4
    rows: dict[int, list[torch.Tensor]] = {i: [] for i in ids}
    generated: dict[int, list[int]] = {i: [] for i in ids}
    while any(len(generated[i]) < new_tokens for i in ids):
        budget, work = 7, {}
        for i in ids:  # decodes first, then prefill chunks fill what is left
            if seqs.computed[i] == len(batch[i]) + len(generated[i]) - 1 and len(generated[i]) < new_tokens:
                work[i], budget = 1, budget - 1
        for i in ids:
            left = len(batch[i]) - seqs.computed[i]
            if left > 0 and budget > 0:
                work[i] = min(left, budget)
                budget -= work[i]
        for i, out in seqs.step(work).items():
            rows[i].append(out)
            if seqs.computed[i] == len(seqs.tokens[i]):  # the last row of a finished prefill / decode samples
                token = int(out[-1].argmax())
                generated[i].append(token)
                seqs.tokens[i].append(token)
    for i, p in zip(ids, batch, strict=True):
        full = seqs.tokens[i][:-1]  # the last sampled token was never run
        torch.testing.assert_close(torch.cat(rows[i]), hf_logits(hf, full), atol=ATOL, rtol=0)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False)
        expected = ref[0, len(p) :].tolist()
        assert generated[i][: len(expected)] == expected
