"""The router of N prefill and M decode instances: a prompt to the fewest queued prompt tokens, its KV to
the most free KV blocks, counting what was routed since each instance's latest report."""

from __future__ import annotations

from meshserve.engine.pd.router import Router

KINDS = {"prefill0": "prefill", "prefill1": "prefill", "decode0": "decode", "decode1": "decode"}


def report(queued: int = 0, free: int = 0) -> dict:
    return {"queued_tokens": queued, "num_free_blocks": free}


def test_a_burst_between_reports_spreads_over_the_instances():
    router = Router(KINDS, block_size=4)
    for name in KINDS:
        router.report(name, report(free=10))
    roles = dict(KINDS)
    # 8 tokens = 2 blocks each: both prefill instances and both decode instances take turns.
    assert [router.route(roles, 8) for _ in range(4)] == [
        ("prefill0", 0),
        ("prefill1", 1),
        ("prefill0", 0),
        ("prefill1", 1),
    ]


def test_the_latest_report_replaces_what_was_routed_before_it():
    router = Router(KINDS, block_size=4)
    router.report("prefill0", report(queued=100))
    router.report("decode0", report(free=3))
    router.report("decode1", report(free=5))
    assert router.route(dict(KINDS), 16) == ("prefill1", 1)  # fewer queued tokens; more free blocks
    assert router.route(dict(KINDS), 16) == ("prefill1", 0)  # decode1 has 5 - 4 routed = 1 free now
    router.report("prefill1", report(queued=0))
    router.report("decode1", report(free=9))
    assert router.route(dict(KINDS), 4) == ("prefill1", 1)


def test_a_decode_instance_switched_to_mixed_takes_prompts_too():
    router = Router(KINDS, block_size=4)
    router.report("prefill0", report(queued=50))
    router.report("prefill1", report(queued=40))
    roles = {**KINDS, "decode1": "mixed"}
    assert router.route(roles, 8) == ("decode1", None)  # it decodes that request itself
    assert router.route(dict(KINDS), 8) == ("prefill1", 0)  # back to decode: prompts go to prefill only
