"""N rank processes (data-parallel attention, expert-parallel MoE) give the single-process engine's tokens;
after close, no rank process is left running."""

from __future__ import annotations

import numpy as np
import pytest

from meshserve.engine import LLM
from meshserve.engine.distributed import RankError
from meshserve.engine.distributed.worker import FAULT_ENV
from meshserve.errors import InputError
from meshserve.traces import ExpertTrace
from tests.engine.distributed.helpers import ARGS, GREEDY, PROMPTS, SINGLE, assert_all_exited, tokens


def test_two_ranks_with_redundant_experts_match_one_process(mixtral, expected):
    with LLM(
        mixtral,
        data_parallel_size=2,
        enable_expert_parallel=True,
        eplb_config={"num_redundant_experts": 2},
        **ARGS,
    ) as llm:
        holds = llm.engine.holds()
        assert holds.shape == (2, 4, 2) and holds.sum() == 2 * 6  # 4 experts + 2 replicas per layer
        assert tokens(llm) == expected
        assert tokens(llm, PROMPTS[:1]) == expected[:1]  # one request: rank 1 steps with empty buffers

        llm.engine.ranks.procs[1].kill()  # a rank dies: the next call to it says so and stops every rank
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


def test_speculative_decoding_per_rank_and_one_expert_trace_from_all_ranks(mixtral, expected, tmp_path):
    spec = {"method": "ngram", "num_speculative_tokens": 2}
    with LLM(
        mixtral,
        data_parallel_size=2,
        enable_expert_parallel=True,
        speculative_config=spec,
        record_expert_trace=str(tmp_path / "t.npz"),
        **ARGS,
    ) as llm:
        engine = llm.engine
        ids = [engine.add_request(prompt, GREEDY) for prompt in PROMPTS]
        outputs, forwarded = {}, 0
        while engine.has_unfinished():
            outputs.update((out.request_id, out.token_ids) for out in engine.step())
            forwarded += sum(engine.last_stats["tokens"].values())  # prompts, drafts, verified: both ranks
        assert [outputs[i] for i in ids] == expected
    trace = ExpertTrace.load(tmp_path / "t.npz")
    assert trace.meta["data_parallel_size"] == 2 and trace.counts.shape[1:] == (2, 4)
    assert (trace.counts.sum(axis=(0, 2)) == trace.top_k * forwarded).all()  # every token, every MoE layer


def test_more_ranks_than_cores_are_refused_unless_oversubscribed(mixtral, monkeypatch):
    """--data-parallel-size 64 on 2 cores once started 64 processes that produced nothing in a minute."""
    import meshserve.engine.distributed.frontend as frontend

    monkeypatch.setattr(frontend, "available_cores", lambda: 1)
    spawned = []
    monkeypatch.setattr(frontend, "SpawnedRanks", lambda spec: spawned.append(spec))
    with pytest.raises(InputError, match="2 rank processes on 1 cores: at most 1 .*--oversubscribe") as err:
        LLM(mixtral, data_parallel_size=2, enable_expert_parallel=True)
    assert err.value.field == "data_parallel_size" and not spawned
    with pytest.raises(AttributeError):  # past the check: our stand-in "ranks" cannot start an engine
        LLM(mixtral, data_parallel_size=2, enable_expert_parallel=True, oversubscribe=True)
    assert len(spawned) == 1
