"""TTFT and TPOT split into phases, from a server's timeline file (``meshserve serve --trace-file``).

TTFT (server side) = front (arrival -> queued) + queue (queued -> first scheduled)
                   + prefill (first scheduled -> first token) + deliver (first token -> its delta on the
                   event loop); front = parse (arrival -> submitted: the HTTP body read and validated,
                   the prompt tokenized) + step wait (submitted -> queued: the engine thread finishing
                   the step in progress before it takes the request).
TPOT = (last token - first token) / (tokens - 1), the gaps between a request's tokens. Every step k
runs start_k -> sampled_k -> end_k, so the time between two samplings, sampled_{k-1} -> sampled_k, is
outputs (end_{k-1} - sampled_{k-1}: stop checks, detokenize, deltas) + loop (start_k - end_{k-1}:
hand-off to the event loop, metrics, new arrivals) + compute (sampled_k - start_k: schedule, forward,
sample), the compute split by whether step k carried prefill tokens (decode-only vs mixed).
A request's TPOT is the sum of those over the steps whose sampling falls in (first token, last token].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from meshserve.errors import InputError

TTFT_PARTS = ("front", "queue", "prefill", "deliver")
FRONT_PARTS = ("parse", "step_wait")  # front, split (records with ``submitted``: AsyncLLM's trace)
TPOT_PARTS = ("compute_decode", "compute_mixed", "outputs", "loop")


def read_trace(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(steps, requests) of a timeline file, each list in file order."""
    steps, requests = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError("trace_file", f"{path}:{n}: not JSON ({err.msg})") from None
            (steps if record.get("type") == "step" else requests).append(record)
    return steps, requests


def within(
    steps: list[dict[str, Any]], requests: list[dict[str, Any]], windows: list[tuple[float, float]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The steps that started and the requests that arrived inside any of ``windows`` ((start, end)
    monotonic seconds; the server's clock is the host's CLOCK_MONOTONIC, so a benchmark script on the
    same host can mark its runs' windows and read one long-lived server's trace run by run)."""
    lo = np.array([w[0] for w in windows], dtype=np.float64)
    hi = np.array([w[1] for w in windows], dtype=np.float64)

    def inside(times: list[float]) -> np.ndarray:
        t = np.asarray(times, dtype=np.float64)[:, None]
        return ((lo <= t) & (t <= hi)).any(axis=1)

    keep_steps = inside([s["start"] for s in steps])
    keep_requests = inside([r["arrival"] for r in requests])
    return (
        [s for s, k in zip(steps, keep_steps, strict=True) if k],
        [r for r, k in zip(requests, keep_requests, strict=True) if k],
    )


def breakdown(steps: list[dict[str, Any]], requests: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per request (those with a first token, and with 2+ tokens for the TPOT parts), seconds in each
    phase: ``ttft`` and TTFT_PARTS (front also as FRONT_PARTS, NaN without ``submitted``), ``tpot`` and
    TPOT_PARTS (each per output token after the first)."""
    done = [
        r for r in requests if r["token_times"] and r["queued"] is not None and r["scheduled"] is not None
    ]
    col = {k: np.array([r[k] for r in done], dtype=np.float64) for k in ("arrival", "queued", "scheduled")}
    first = np.array([r["token_times"][0] for r in done], dtype=np.float64)
    delivered = np.array([(r["delivered"] or [np.nan])[0] for r in done], dtype=np.float64)
    out = {
        "front": col["queued"] - col["arrival"],
        "queue": col["scheduled"] - col["queued"],
        "prefill": first - col["scheduled"],
        "deliver": delivered - first,
        "ttft": delivered - col["arrival"],
    }
    submitted = np.array(
        [np.nan if r.get("submitted") is None else r["submitted"] for r in done], dtype=np.float64
    )
    out["parse"], out["step_wait"] = submitted - col["arrival"], col["queued"] - submitted
    multi = [r for r in done if len(r["token_times"]) > 1]
    t0 = np.array([r["token_times"][0] for r in multi], dtype=np.float64)
    t1 = np.array([r["token_times"][-1] for r in multi], dtype=np.float64)
    gaps = np.array([len(r["token_times"]) - 1 for r in multi], dtype=np.float64)
    out["tpot"] = (t1 - t0) / gaps if multi else np.zeros(0)
    timed = [s for s in steps if "sampled" in s]
    if not timed or not multi:
        out.update({k: np.full(len(multi), np.nan) for k in TPOT_PARTS})
        return out
    start, sampled, end = (
        np.array([s[k] for s in timed], dtype=np.float64) for k in ("start", "sampled", "end")
    )
    mixed = np.array([s.get("tokens", {}).get("prefill", 0) > 0 for s in timed])
    prev_end = np.concatenate([[start[0]], end[:-1]])  # the first step has no step before it
    prev_sampled = np.concatenate([[start[0]], sampled[:-1]])
    compute = sampled - start
    per_step = {
        "compute_decode": np.where(mixed, 0.0, compute),
        "compute_mixed": np.where(mixed, compute, 0.0),
        "outputs": prev_end - prev_sampled,
        "loop": start - prev_end,
    }
    # steps whose sampling falls in (t0, t1]: [lo, hi) in step order (sampling times only grow)
    lo, hi = np.searchsorted(sampled, t0, "right"), np.searchsorted(sampled, t1, "right")
    for name, values in per_step.items():
        cum = np.concatenate([[0.0], np.cumsum(values)])
        out[name] = (cum[hi] - cum[lo]) / gaps
    return out


def format_breakdown(parts: dict[str, np.ndarray], title: str = "") -> str:
    """Mean and p99 in ms of TTFT and TPOT and the mean of each part."""

    def ms(values: np.ndarray, q: float | None = None) -> str:
        values = values[np.isfinite(values)]
        if not len(values):
            return "-"
        return f"{1e3 * (values.mean() if q is None else np.percentile(values, q)):.1f}"

    lines = [f"{f' {title} ':=^60}" if title else "=" * 60]
    for total, names in (("ttft", TTFT_PARTS), ("tpot", TPOT_PARTS)):
        n = len(parts[total])
        lines.append(
            f"{total.upper()} ({n} requests): mean {ms(parts[total])} ms, p99 {ms(parts[total], 99)} ms"
        )
        for name in names:
            lines.append(f"  {name:<16} {ms(parts[name]):>8} ms")
            if name == "front":
                lines += [f"    {part:<14} {ms(parts[part]):>8} ms" for part in FRONT_PARTS]
    return "\n".join(lines)
