"""N prefill and M decode processes behind one PDEngine: two prefill instances feeding one decode instance,
and one prefill instance feeding two decode instances. The router spreads the prompts over both instances
of the doubled role, each request's KV goes point to point to the decode instance chosen for it, the
tokens equal the mixed engine's, and every instance gives back every block."""

from __future__ import annotations

import pytest

from meshserve.config import EngineConfig
from meshserve.engine.pd.frontend import PDEngine
from tests.engine.pd.test_pd_processes import assert_no_blocks_held, settled
from tests.engine.pd.workload import ARGS, GREEDY, PROMPTS, mixed_tokens


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", num_hidden_layers=2))


@pytest.fixture(scope="module")
def expected(model) -> list[list[int]]:
    return mixed_tokens(model)


@pytest.mark.parametrize(
    ("pd", "senders", "receivers"),
    [
        ("prefill=2,decode=1", ["prefill0", "prefill1"], ["decode"]),
        ("prefill=1,decode=2", ["prefill"], ["decode0", "decode1"]),
    ],
)
def test_n_prefill_and_m_decode_processes_equal_mixed(model, expected, pd, senders, receivers):
    config = EngineConfig.from_args(model, pd=pd, num_threads=2, **ARGS)
    with PDEngine(config, transfer_timeout_s=30.0) as engine:
        assert set(engine.kinds) == {*senders, *receivers}
        outs = engine.generate(PROMPTS, GREEDY, timeout_s=180)
        assert [o.token_ids for o in outs] == expected
        stats = settled(engine)
        for name in senders + receivers:  # the router used both instances of the doubled role
            assert stats[name]["transfer"]["transfers"] > 0, (name, stats[name])
        sent = sum(stats[n]["transfer"]["transfers"] for n in senders)
        assert sent == sum(stats[n]["transfer"]["transfers"] for n in receivers) == len(PROMPTS)
        assert_no_blocks_held(stats)
    assert not any(p.is_alive() for p in engine.procs.values())
