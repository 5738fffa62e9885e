"""The phase breakdown on a hand-made trace: each step's time lands in the part it belongs to."""

from __future__ import annotations

import json

import numpy as np
import pytest

from meshserve.bench.cli import parse_window
from meshserve.bench.phases import breakdown, format_breakdown, read_trace, within
from meshserve.errors import InputError


def step(start: float, sampled: float, end: float, prefill: int = 0) -> dict:
    return {
        "type": "step",
        "start": start,
        "sampled": sampled,
        "end": end,
        "tokens": {"prefill": prefill, "decode": 1},
    }


def test_decode_gaps_split_into_compute_outputs_and_loop():
    # steps: a prefill step (0-10 ms), then decode-only steps of 4 ms compute, 1 ms outputs, 2 ms loop
    steps = [step(0.000, 0.010, 0.011, prefill=8)]
    t = 0.011
    for _ in range(3):
        steps.append(step(t + 0.002, t + 0.006, t + 0.007))
        t += 0.007
    request = {
        "type": "request",
        "arrival": -0.003,
        "submitted": -0.0025,
        "queued": -0.001,
        "scheduled": 0.0,
        "finished": steps[-1]["end"],
        "token_times": [s["sampled"] for s in steps],
        "delivered": [s["end"] + 0.0005 for s in steps],
    }
    parts = breakdown(steps, [request])
    np.testing.assert_allclose(
        [parts[k][0] for k in ("front", "queue", "prefill", "deliver", "ttft")],
        [0.002, 0.001, 0.010, 0.0015, 0.0145],
    )
    np.testing.assert_allclose([parts["parse"][0], parts["step_wait"][0]], [0.0005, 0.0015])
    np.testing.assert_allclose(
        [parts[k][0] for k in ("tpot", "compute_decode", "compute_mixed", "outputs", "loop")],
        [0.007, 0.004, 0.0, 0.001, 0.002],
    )
    assert "TPOT (1 requests): mean 7.0 ms" in format_breakdown(parts, "run")


def test_a_trace_that_is_not_json_lines_is_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"type": "step"}) + "\nnot json\n")
    with pytest.raises(InputError, match="t.jsonl:2"):
        read_trace(path)


def test_windows_keep_the_steps_and_requests_of_their_runs():
    # one long-lived server's trace holding two runs, 0-1 s and 5-6 s: a script reads them one at a time
    steps = [step(t, t + 0.01, t + 0.02) for t in (0.5, 2.0, 5.5)]
    requests = [{"type": "request", "arrival": t} for t in (0.2, 3.0, 5.9)]
    kept_steps, kept_requests = within(steps, requests, [(0.0, 1.0), (5.0, 6.0)])
    assert [s["start"] for s in kept_steps] == [0.5, 5.5]
    assert [r["arrival"] for r in kept_requests] == [0.2, 5.9]


def test_a_window_is_start_colon_end():
    assert parse_window("1.5:2") == (1.5, 2.0)
    for bad in ("1.5", "2:1", "a:b"):
        with pytest.raises(InputError, match="window"):
            parse_window(bad)
