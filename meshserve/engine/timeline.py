"""A request's timeline: monotonic timestamps of the moments that split its latency into phases.

    arrival --front--> queued --queue--> scheduled --prefill--> first_token --decode--> finished
                                                    each token: token_times[i]
                                                    each delta reaching its stream: delivered[j]

``arrival`` is when the caller received the request (the HTTP server: when its head reached the app;
``AsyncLLM``'s caller otherwise), ``queued`` when the scheduler took it (after tokenization and the wait
for the end of the running step; the trace file adds ``submitted``, the hand-over to the engine thread),
``scheduled`` its first step, ``token_times`` the end of the step that produced each output token, and
``delivered`` when each streamed delta reached the event loop (the cross-thread hop). The engine
thread writes everything but ``delivered``; the event loop appends to that one only. Recording is a
``time.monotonic()`` and an append per token: cheap enough to stay on always.

The phases are vLLM's: queue = queued -> scheduled, prefill = scheduled -> first token, decode = first
token -> finished, TTFT = arrival -> first token.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from meshserve.atomic import check_writable

now = time.monotonic


@dataclass(slots=True)
class Timeline:
    arrival: float = field(default_factory=now)
    queued: float | None = None
    scheduled: float | None = None
    finished: float | None = None
    num_prompt_tokens: int = 0
    token_times: list[float] = field(default_factory=list)
    delivered: list[float] = field(default_factory=list)

    @property
    def first_token(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    def phases(self) -> dict[str, float]:
        """Seconds in each phase that has ended (vLLM's names without the unit)."""
        out: dict[str, float] = {}
        first = self.first_token
        if self.queued is not None:
            out["front"] = self.queued - self.arrival
            if self.scheduled is not None:
                out["queue"] = self.scheduled - self.queued
        if first is not None:
            out["ttft"] = first - self.arrival
            if self.scheduled is not None:
                out["prefill"] = first - self.scheduled
            if self.finished is not None:
                out["decode"] = self.finished - first
        if self.finished is not None:
            out["e2e"] = self.finished - self.arrival
            if self.scheduled is not None:
                out["inference"] = self.finished - self.scheduled
        return out

    def record(self, request_id: str) -> dict[str, Any]:
        """The JSON-lines record of a finished request (times in seconds, monotonic clock)."""
        return {
            "type": "request",
            "id": request_id,
            "prompt_tokens": self.num_prompt_tokens,
            "arrival": self.arrival,
            "queued": self.queued,
            "scheduled": self.scheduled,
            "finished": self.finished,
            "token_times": self.token_times,
            "delivered": self.delivered,
        }


class TimelineWriter:
    """One run's timelines as JSON lines: a ``step`` record per engine step (engine thread) and a
    ``request`` record per finished request (event loop); ``meshserve serve --trace-file``.
    ``benchmarks/serve_phases.py`` reads it back into the phase breakdown of TTFT and TPOT."""

    def __init__(self, path: str) -> None:
        check_writable(path, "trace_file")
        self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._lock = threading.Lock()  # two threads write whole lines

    def step(self, stats: dict[str, Any]) -> None:
        keys = ("start", "sampled", "end", "tokens", "num_seqs", "running", "waiting", "budget")
        self._write({"type": "step", **{k: stats[k] for k in keys if k in stats}})

    def request(self, request_id: str, timeline: Timeline, submitted: float | None = None) -> None:
        """``submitted``: when the front door handed it to the engine thread (AsyncLLM), splitting front
        into parse (HTTP body, tokenization) and the wait for the step in progress to end."""
        self._write({**timeline.record(request_id), "submitted": submitted})

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if not self._file.closed:
                self._file.write(line)

    def close(self) -> None:
        with self._lock:
            self._file.close()
