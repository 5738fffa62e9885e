"""The demo's serving half: a mixed workload on the shipped tiny MoE with its draft, expert trace recorded.

Two waves through one engine: first code prompts of different lengths plus one request that opens a
shared prefix, then more requests on that prefix (they find its blocks in the prefix cache). All
greedy, with draft-model speculative decoding, so the printed acceptance rate is the draft's real one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshserve.assets import TINY_DRAFT, TINY_MOE
from meshserve.engine import LLM, SamplingParams
from meshserve.engine.outputs import RequestOutput
from meshserve.models.tokenizer import Tokenizer
from meshserve.training.prompts import code_prompts

# Chosen on the previous (Mixtral) pair at batch 1, quiet (benchmarks/spec.py, docs/models.md): k=1 / 2 / 3
# / 4 accepted 78.5 / 74.2 / 64.6 / 55.8% and ran 0.98 / 1.13 / 1.15 / 1.13x fp32. Not re-measured for the
# DeepSeek-style pair (its demo acceptance at k=3: 48.6%, docs/models.md).
SPECULATIVE_TOKENS = 3


@dataclass
class ServingReport:
    outputs: list[RequestOutput]
    seconds: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    prefix_hit_rate: float
    acceptance_rate: float
    mean_accepted_len: float
    trace: Path


def workload(tokenizer: Tokenizer, seed: int = 0) -> list[tuple[list[list[int]], list[SamplingParams]]]:
    """Two waves of (prompts, params): different lengths + a shared prefix, then more on that prefix."""
    rng = np.random.default_rng(seed)
    varied = code_prompts(tokenizer, 10, 24, 160, seed=seed)
    (prefix,) = code_prompts(tokenizer, 1, 160, 160, seed=seed + 1)
    tails = [p[1:] for p in code_prompts(tokenizer, 6, 8, 16, seed=seed + 2)]  # drop their BOS
    shared = [prefix + tail for tail in tails]

    def params(n: int) -> list[SamplingParams]:
        return [SamplingParams(temperature=0, max_tokens=int(m)) for m in rng.integers(24, 97, n)]

    return [(varied + shared[:1], params(len(varied) + 1)), (shared[1:], params(len(shared) - 1))]


def run_serving(
    out_dir: Path, target: Path = TINY_MOE, draft: Path = TINY_DRAFT, seed: int = 0
) -> ServingReport:
    """Run the workload, return the figures; the expert trace goes to out_dir/expert_trace.npz."""
    trace = out_dir / "expert_trace.npz"
    spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": SPECULATIVE_TOKENS}
    with LLM(
        str(target),
        dtype="float32",
        speculative_config=spec,
        record_expert_trace=str(trace),
        max_num_seqs=16,
        max_num_batched_tokens=512,
        seed=seed,
    ) as llm:
        waves = workload(llm.tokenizer, seed)
        start = time.perf_counter()
        outputs = [out for prompts, params in waves for out in llm.generate(prompts, params)]
        seconds = time.perf_counter() - start
        engine = llm.engine
        prefix_hit = engine.blocks.prefix_cache.stats()["hit_rate"]
        spec_stats = engine.spec.stats()
    first = np.array([o.metrics.first_token_time for o in outputs])
    finish = np.array([o.metrics.finish_time for o in outputs])
    n_out = np.array([len(o.token_ids) for o in outputs])
    return ServingReport(
        outputs=outputs,
        seconds=seconds,
        prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
        output_tokens=int(n_out.sum()),
        ttft_s=first - np.array([o.metrics.arrival_time for o in outputs]),
        tpot_s=(finish - first)[n_out > 1] / (n_out[n_out > 1] - 1),
        prefix_hit_rate=float(prefix_hit),
        acceptance_rate=float(spec_stats["spec_acceptance_rate"]),
        mean_accepted_len=float(spec_stats["spec_mean_accepted_len"]),
        trace=trace,
    )
