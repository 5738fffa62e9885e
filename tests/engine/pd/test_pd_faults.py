"""Transfers that fail: the decode process dies mid-transfer, a transfer times out. Every request completes
correctly or ends with an error naming the cause, and neither side keeps a block."""

from __future__ import annotations

import time

import pytest

from meshserve.config import EngineConfig
from meshserve.engine.pd.frontend import PDEngine
from tests.engine.pd.test_pd_processes import assert_no_blocks_held, settled
from tests.engine.pd.workload import ARGS, GREEDY, PROMPTS, mixed_tokens

TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", num_hidden_layers=2))


def drill(model: str, fault: str) -> PDEngine:
    config = EngineConfig.from_args(model, switches={"MESHSERVE_PD_FAULT": fault}, **ARGS)
    return PDEngine(config, transfer_timeout_s=TIMEOUT_S)


def test_decode_killed_mid_transfer_fails_requests_clearly_and_frees_prefill_blocks(model):
    with drill(model, "die:recv") as pd:
        outs = pd.generate(PROMPTS[:2], GREEDY, timeout_s=120)
        assert [o.finish_reason for o in outs] == ["error", "error"]
        assert all("decode instance exited (code 17)" in o.outputs[0].error for o in outs)
        stats = settled(pd)
        assert set(stats) == {"prefill"}
        assert stats["prefill"]["transfer"]["failures"] >= 2  # tried, then tried once more
        assert_no_blocks_held(stats)
    assert not any(p.is_alive() for p in pd.procs.values())


def test_a_transfer_timeout_is_retried_and_the_request_completes_exactly(model):
    expected = mixed_tokens(model, PROMPTS[:2])
    with drill(model, "stall:send") as pd:
        outs = pd.generate(PROMPTS[:2], GREEDY, timeout_s=120)
        assert [o.token_ids for o in outs] == expected
        stats = settled(pd)
        assert stats["decode"]["transfer"]["failures"] == 1  # its receive timed out, blocks freed
        assert stats["prefill"]["transfer"]["failures"] == 1  # its send found the pair closed: retried
        assert stats["decode"]["transfer"]["transfers"] == 2
        assert_no_blocks_held(stats)


def abort_after_the_first_token(model: str, fault: str, wait_s: float = 0.0) -> dict:
    """Abort a streamed request ``wait_s`` after its first token arrives (the prefill instance streams it
    as it hands the request off), under the drill ``fault``; the instances' stats once settled."""
    config = EngineConfig.from_args(model, switches={"MESHSERVE_PD_FAULT": fault}, **ARGS)
    with PDEngine(config, transfer_timeout_s=30.0) as pd:
        request_id = pd.add_request(PROMPTS[0], GREEDY, stream=True)
        first = []
        while not first:
            first = [o for o in pd.poll(0.1) if o.request_id == request_id]
        assert not first[0].finished and len(first[0].outputs[0].token_ids) == 1
        time.sleep(wait_s)
        assert pd.abort(request_id)
        stats = settled(pd)
        assert not pd.has_unfinished()
    assert_no_blocks_held(stats)
    return stats


def test_a_request_aborted_while_its_offer_waits_is_cancelled_on_the_decode_side(model):
    """The caller goes away while the request's offer waits for a slow decode side (the drill holds each
    offer 1 s): the decode instance drops the offer (no blocks, no decode step) and the prefill instance
    frees the request's blocks."""
    stats = abort_after_the_first_token(model, "hold:offer")
    assert stats["decode"]["transfer"]["cancelled"] == stats["prefill"]["transfer"]["cancelled"] == 1
    assert stats["decode"]["transfer"]["transfers"] == 0 and stats["decode"]["steps"] == 0


def test_a_request_aborted_while_its_kv_is_in_flight_gets_no_decode_step(model):
    """The caller goes away while the request's KV is being received (the drill stalls the receive 2 s;
    the abort comes 1 s after the hand-off): the decode instance reads the abort before its next step, so
    the request costs it no decode step."""
    stats = abort_after_the_first_token(model, "stall:recv", wait_s=1.0)
    assert stats["decode"]["transfer"]["transfers"] == 1 and stats["decode"]["steps"] == 0
