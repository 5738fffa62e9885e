"""N rank processes (data-parallel attention, expert-parallel MoE) give the single-process engine's tokens;
after close, no rank process is left running."""

from __future__ import annotations

import numpy as np
import pytest

from meshserve.engine import LLM
from meshserve.engine.distributed import RankError
from meshserve.engine.distributed.worker import FAULT_ENV
from meshserve.errors import InputError
from tests.engine.distributed.helpers import ARGS, PROMPTS, SINGLE, assert_all_exited, tokens


def test_two_ranks_with_redundant_experts_match_one_process(mixtral, expected):
    with LLM(mixtral, data_parallel_size=2, enable_expert_parallel=True,
             eplb_config={"num_redundant_experts": 2}, **ARGS) as llm:
        holds = llm.engine.holds()
        assert holds.shape == (2, 4, 2) and holds.sum() == 2 * 6  # 4 experts + 2 replicas per layer
        assert tokens(llm) == expected
        assert tokens(llm, PROMPTS[:1]) == expected[:1]  # one request: rank 1 steps with empty buffers

        llm.engine._procs[1].kill()  # a rank dies: the next call to it says so and stops every rank
        died = r"rank 1 exited \(code -9\) (during|before) (add|step); all 2 ranks"
        with pytest.raises(RankError, match=died):
            tokens(llm)
    assert_all_exited(llm)


@pytest.mark.slow
def test_dense_model_runs_as_plain_data_parallel(tiny_model_dir):
    llama = str(tiny_model_dir("llama"))
    with LLM(llama, **SINGLE) as one:
        want = tokens(one)
    with LLM(llama, data_parallel_size=2, enable_expert_parallel=True, **ARGS) as llm:
        assert llm.engine.holds() is None
        assert tokens(llm) == want
    assert_all_exited(llm)


def test_clear_errors_before_any_rank_starts(mixtral):
    with pytest.raises(InputError, match="data_parallel_size: .* 8 ranks > 4 experts"):
        LLM(mixtral, data_parallel_size=8, enable_expert_parallel=True)
    holds = np.ones((2, 4, 2), dtype=bool)
    holds[0, 2] = False
    with pytest.raises(InputError, match="expert_placement: expert 2 of MoE layer 0 is on no rank"):
        LLM(mixtral, data_parallel_size=2, enable_expert_parallel=True, expert_placement=holds)
    with pytest.raises(InputError, match="eplb_config.window: unknown key"):
        LLM(mixtral, data_parallel_size=2, enable_expert_parallel=True, eplb_config={"window": 3})
    with pytest.raises(InputError, match="enable_eplb: needs enable_expert_parallel"):
        LLM(mixtral, data_parallel_size=2, enable_eplb=True)


def test_a_rank_that_fails_to_start_shuts_every_rank_down(mixtral, monkeypatch):
    import multiprocessing

    monkeypatch.setenv(FAULT_ENV, "start:1")
    with pytest.raises(RankError, match="rank 1 failed during start: .*injected start failure"):
        LLM(mixtral, data_parallel_size=2, enable_expert_parallel=True, **ARGS)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("meshserve-rank")]

