"""ServerMetrics.on_step runs in the engine thread between two forwards: right counts, few lookups."""

from __future__ import annotations

import time
from types import SimpleNamespace

from meshserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from meshserve.engine.timeline import Timeline
from meshserve.server.metrics import ServerMetrics


def step_outputs(n: int) -> list[RequestOutput]:
    outs = []
    for i in range(n):
        timeline = Timeline()
        timeline.token_times.append(time.monotonic())
        metrics = RequestMetrics(time.time(), time.time(), None, timeline)
        outs.append(
            RequestOutput(f"r{i}", None, [1] * 8, [CompletionOutput(0, "", [5], None)], False, metrics)
        )
    return outs


def fake_engine(decodes: int) -> SimpleNamespace:
    stats = {"running": decodes, "waiting": 0, "kv_usage": 0.1, "tokens": {"prefill": 0, "decode": decodes}}
    return SimpleNamespace(
        last_stats=stats, num_preemptions=0, blocks=SimpleNamespace(prefix_cache=None), spec=None
    )


def test_each_series_is_looked_up_once_not_per_output_and_step():
    metrics = ServerMetrics("m")
    lookups = 0
    original = metrics.generation_tokens.labels

    def counted(*args):
        nonlocal lookups
        lookups += 1
        return original(*args)

    metrics.generation_tokens.labels = counted
    engine, outs = fake_engine(32), step_outputs(32)
    for _ in range(10):
        metrics.on_step(engine, outs)
    assert lookups == 1  # was 320: a lock and a dict lookup per output, between two forwards
    text = metrics.render()[0].decode()
    assert 'vllm:generation_tokens_total{model_name="m"} 320.0' in text
    assert 'meshserve:step_tokens_count{kind="decode",model_name="m"} 10.0' in text
    assert 'kind="verify"' not in text  # a series shows once it is used, as before
