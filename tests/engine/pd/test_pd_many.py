"""N prefill and M decode processes behind one PDEngine: two prefill instances feeding one decode instance,
and one prefill instance feeding two decode instances. The router spreads the prompts over both instances
of the doubled role, each request's KV goes point to point to the decode instance chosen for it, the
tokens equal the mixed engine's, and every instance gives back every block."""

from __future__ import annotations

import time

import pytest

from meshserve.config import EngineConfig
from meshserve.engine.pd.frontend import PDEngine
from meshserve.errors import InputError
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


def test_switching_one_of_two_decode_instances_mid_run_keeps_every_token(model, expected):
    """decode1 turns mixed mid-run (prompts may then go to it, by the fewest queued prompt tokens) and
    back; the streamed tokens stay the mixed engine's and no instance keeps a block."""
    config = EngineConfig.from_args(model, pd="prefill=1,decode=2", num_threads=2, **ARGS)
    with PDEngine(config) as engine:
        ids = [engine.add_request(p, GREEDY, stream=True) for p in PROMPTS[:3]]
        tokens: dict[str, list[int]] = {}
        deltas, deadline = 0, time.monotonic() + 180
        while len(ids) < len(PROMPTS) or engine.has_unfinished():
            assert time.monotonic() < deadline
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
                deltas += 1
            if deltas >= 3 and len(ids) == 3:
                engine.set_role("decode1", "mixed")
                ids += [engine.add_request(p, GREEDY, stream=True) for p in PROMPTS[3:]]
            if deltas >= 20 and engine.roles["decode1"] == "mixed":
                engine.set_role("decode1", "decode")
        assert [tokens[i] for i in ids] == expected
        assert [(i, r) for _, i, r in engine.switches] == [("decode1", "mixed"), ("decode1", "decode")]
        with pytest.raises(InputError, match="switches between decode and mixed"):
            engine.set_role("decode0", "prefill")
        assert_no_blocks_held(settled(engine))
