"""A served request's timeline starts when its head reaches the server, so TTFT's front phase shows
the HTTP body and the tokenizing (parse) apart from the wait for the engine's step (step_wait)."""

from __future__ import annotations

import json
import time

import httpx

from meshserve.bench.phases import breakdown, read_trace
from tests.server.conftest import MODEL, start_server


def test_a_slowly_sent_body_counts_in_the_parse_part_of_front(model_dir, tmp_path):
    trace = tmp_path / "trace.jsonl"
    running = start_server(model_dir, trace_file=str(trace))
    body = json.dumps({"model": MODEL, "prompt": [1, 5, 6], "max_tokens": 2, "ignore_eos": True}).encode()

    def slowly():  # a chunked body: half now, the rest 0.3 s later
        yield body[: len(body) // 2]
        time.sleep(0.3)
        yield body[len(body) // 2 :]

    try:
        response = httpx.post(
            running.url + "/v1/completions",
            content=slowly(),
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
    finally:
        running.stop()  # closes the trace file
    steps, requests = read_trace(trace)
    (record,) = requests
    assert record["arrival"] <= record["submitted"] <= record["queued"] <= record["scheduled"]
    parts = breakdown(steps, requests)
    assert parts["parse"][0] >= 0.3  # the body's wait is the server's time too (its TTFT counts it)
    assert abs(parts["parse"][0] + parts["step_wait"][0] - parts["front"][0]) < 1e-9
