"""A DeepSeek-style model (MLA, grouped routing, shared experts) served expert-parallel over two ranks gives
the single-process engine's tokens: every rank runs the shared experts itself, the routed ones are sharded."""

from __future__ import annotations

from meshserve.engine import LLM
from tests.engine.distributed.helpers import ARGS, PROMPTS, SINGLE, assert_all_exited, tokens


def test_deepseek_two_ranks_match_one_process(tiny_model_dir):
    path = str(tiny_model_dir("deepseek_v3"))
    with LLM(path, **SINGLE) as one:
        expected = tokens(one)
    with LLM(
        path,
        data_parallel_size=2,
        enable_expert_parallel=True,
        eplb_config={"num_redundant_experts": 2},
        **ARGS,
    ) as llm:
        holds = llm.engine.holds()
        # [MoE layer, expert, rank]: layers 1 and 2 (layer 0 is dense: first_k_dense_replace), 8 routed
        # experts + 2 replicas per layer, every expert somewhere, no rank holding them all
        assert holds.shape == (2, 8, 2) and holds.sum() == 2 * (8 + 2)
        assert (holds.sum(axis=2) >= 1).all() and (holds.sum(axis=1) < 8).all()
        assert tokens(llm) == expected
        assert tokens(llm, PROMPTS[:1]) == expected[:1]  # one request: rank 1 joins with an empty batch
    assert_all_exited(llm)
