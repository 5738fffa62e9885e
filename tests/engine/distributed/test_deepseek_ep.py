"""A DeepSeek-style model (MLA, grouped routing, shared experts) served expert-parallel over two ranks gives
the single-process engine's tokens: every rank runs the shared experts itself, the routed ones are sharded."""

from __future__ import annotations

import pytest

from meshserve.engine import LLM
from meshserve.traces import ExpertTrace
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


@pytest.mark.parametrize("expert_parallel", [True, False])
def test_mtp_draft_routing_is_traced_as_the_single_process_engine_traces_it(
    expert_parallel, tiny_model_dir, tmp_path
):
    """The MTP layer's MoE (whole on every rank) routes each rank's drafts: the trace holds them as one draft
    layer after the main ones, as the single-process engine records it, expert-parallel or data-parallel
    alone. One request, so rank 0 steps as the single engine does (rank 1 idles) and the two traces' layers
    sum to the same."""
    path = str(tiny_model_dir("deepseek_v3", num_nextn_predict_layers=1))
    spec = {"method": "mtp", "num_speculative_tokens": 3}
    with LLM(path, **SINGLE, speculative_config=spec, record_expert_trace=str(tmp_path / "one.npz")) as llm:
        expected = tokens(llm, PROMPTS[:1])
    with LLM(
        path,
        data_parallel_size=2,
        enable_expert_parallel=expert_parallel,
        speculative_config=spec,
        record_expert_trace=str(tmp_path / "two.npz"),
        **ARGS,
    ) as llm:
        assert tokens(llm, PROMPTS[:1]) == expected
    one, two = ExpertTrace.load(tmp_path / "one.npz"), ExpertTrace.load(tmp_path / "two.npz")
    assert two.draft_layers == one.draft_layers == 1 and two.counts.shape == one.counts.shape
    assert (two.counts.sum(axis=2) == one.counts.sum(axis=2)).all()  # per step and layer, the draft's too
    assert two.counts[:, -1].sum() > 0
    assert_all_exited(llm)
