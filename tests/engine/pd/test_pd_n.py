"""Parallel sampling (n > 1) on a prefill/decode pair: the prompt runs once on the prefill instance, each of
the n completions is handed off after its own first token, and the decode instance receives the prompt's
full blocks once (the other completions find them in its prefix cache). Seeded completions equal the
mixed engine's, streamed or not, and no block is left held."""

from __future__ import annotations

import time

import pytest

from meshserve.config import EngineConfig
from meshserve.engine import LLM, SamplingParams
from meshserve.engine.pd.frontend import PDEngine
from tests.engine.pd.test_pd_processes import assert_no_blocks_held, settled
from tests.engine.pd.workload import ARGS

N = 3
PARAMS = SamplingParams(n=N, temperature=0.8, seed=11, max_tokens=8, ignore_eos=True)
PROMPTS = [[1] + [7, 8, 9] * 6, [1] + list(range(100, 117))]  # no block in common


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", num_hidden_layers=2))


def completions(outs: list) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_n_seeded_completions_on_a_pair_equal_mixed_and_share_the_prompts_blocks(model):
    with LLM(model, **ARGS) as llm:
        expected = completions(llm.generate(PROMPTS, PARAMS, use_tqdm=False))
    with PDEngine(EngineConfig.from_args(model, **ARGS)) as pd:
        outs = pd.generate(PROMPTS, PARAMS, timeout_s=120)
        assert [[c.index for c in o.outputs] for o in outs] == [list(range(N))] * len(PROMPTS)
        assert completions(outs) == expected
        # Each completion moves on its own; the prompt's full blocks go once: the first completion sends
        # all its blocks, the others only the last, partly filled one.
        size = ARGS["block_size"]
        full, blocks = [len(p) // size for p in PROMPTS], [-(-len(p) // size) for p in PROMPTS]
        transfer = settled(pd)["decode"]["transfer"]
        assert transfer["transfers"] == N * len(PROMPTS)
        assert transfer["blocks_sent"] == sum(
            b + (N - 1) * (b - f) for b, f in zip(blocks, full, strict=True)
        )
        ids = [pd.add_request(p, PARAMS, stream=True) for p in PROMPTS]
        streamed = {i: [[] for _ in range(N)] for i in ids}
        deadline = time.monotonic() + 120
        while pd.has_unfinished():
            assert time.monotonic() < deadline
            for out in pd.step():
                for c in out.outputs:
                    streamed[out.request_id][c.index] += c.token_ids
        assert [streamed[i] for i in ids] == expected
        assert_no_blocks_held(settled(pd))
