"""A prefill process and a decode process (PDEngine) over torch.distributed: the tokens equal the mixed
engine's, shared prefixes are not sent again, and every block comes back on both sides."""

from __future__ import annotations

import time

import pytest

from meshserve.config import EngineConfig
from meshserve.engine import LLM
from meshserve.engine.pd.config import parse_pd
from meshserve.engine.pd.frontend import PDEngine
from meshserve.errors import InputError
from tests.engine.pd.workload import ARGS, GREEDY, PROMPTS, mixed_tokens


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", num_hidden_layers=2))


def settled(pd: PDEngine, timeout_s: float = 60.0) -> dict:
    """The instances' stats once no handed-off request waits for its transfer any more."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = pd.stats()
        if (
            all(s["handoffs"] == 0 and s["running"] == 0 for s in stats.values())
            or time.monotonic() > deadline
        ):
            return stats
        time.sleep(0.2)


def assert_no_blocks_held(stats: dict) -> None:
    for role, s in stats.items():
        assert s["num_free_blocks"] == s["num_blocks"], f"{role} holds blocks: {s}"


def test_one_prefill_and_one_decode_process_equal_mixed(model):
    expected = mixed_tokens(model)
    with PDEngine(EngineConfig.from_args(model, **ARGS), transfer_timeout_s=30.0) as pd:
        outs = pd.generate(PROMPTS, GREEDY, timeout_s=120)
        assert [o.token_ids for o in outs] == expected
        stats = settled(pd)
        transfer = stats["decode"]["transfer"]
        assert transfer["transfers"] == len(PROMPTS) and transfer["failures"] == 0
        assert transfer["blocks_skipped"] > 0  # the decode side's prefix cache held shared blocks
        assert stats["prefill"]["transfer"]["bytes"] == transfer["bytes"] > 0
        assert_no_blocks_held(stats)
    assert not any(p.is_alive() for p in pd.procs.values())


def test_llm_with_pd_runs_the_pair_behind_generate(model):
    expected = mixed_tokens(model, PROMPTS[:3])
    with LLM(model, pd="prefill=1,decode=1", **ARGS) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False)] == expected
        assert set(llm.engine.role_stats) == {"prefill", "decode"}  # reported while they worked


def test_pd_spec_is_checked():
    assert parse_pd("prefill=2,decode=3")[0] == {"prefill": 2, "decode": 3}
    with pytest.raises(InputError, match="at least one prefill and one decode"):
        parse_pd("prefill=0,decode=1")
    with pytest.raises(InputError, match="at most 16 instances"):
        parse_pd("prefill=9,decode=8")
    with pytest.raises(InputError, match="pd"):
        parse_pd("prefill")
