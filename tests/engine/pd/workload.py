"""The workload every P/D test shares: prompts sharing prefixes (prefix cache hits on both sides), a
repetitive one (n-gram drafts get accepted), and engine settings with prefix caching and speculation on."""

from __future__ import annotations

from meshserve.engine import LLM, SamplingParams

NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 3,
    "prompt_lookup_max": 3,
    "prompt_lookup_min": 1,
    "disable_by_batch_size": None,
}
ARGS = {
    "max_num_batched_tokens": 16,
    "max_num_seqs": 4,
    "block_size": 4,
    "max_model_len": 128,
    "enable_prefix_caching": True,
    "speculative_config": NGRAM,
}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SHARED = [1] + list(range(20, 33))
PROMPTS = [
    SHARED + [40, 41, 42],
    [1] + [7, 8, 9] * 6,
    [1, 7],
    SHARED + list(range(60, 70)),
    [1] + list(range(100, 117)),
    SHARED + [40, 41, 42, 43],
]


def mixed_tokens(model: str, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    """The mixed engine's greedy tokens: what every P/D arrangement must reproduce."""
    with LLM(model, **ARGS) as llm:
        return [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
