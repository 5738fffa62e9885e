"""Prometheus metrics of a served engine, under vLLM's names where vLLM has one (so dashboards carry over).

Updated from the engine thread after every step (``ServerMetrics.on_step``): queue gauges, KV usage,
counters fed by the engine's cumulative totals, and per-request latencies observed as outputs stream.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from meshserve.engine.engine import Engine
from meshserve.engine.outputs import RequestOutput
from meshserve.server.pd_metrics import PDMetrics

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServerMetrics:
    """All metrics in one registry (one server per process, but tests run several)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r, self.model = self.registry, model_name

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple = LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.running = gauge("vllm:num_requests_running", "Requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent.")
        self.prefix_hit_rate = gauge(
            "meshserve:prefix_cache_hit_rate", "Prompt tokens found cached / queried."
        )
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter(
            "vllm:num_preemptions", "Requests preempted (KV dropped, recomputed later)."
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generation tokens produced.")
        self.spec_drafts = counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.spec_accepted = counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.spec_acceptance = gauge("meshserve:spec_decode_acceptance_rate", "Accepted / proposed drafts.")
        self.step_tokens = Histogram(
            "meshserve:step_tokens",
            "Tokens per engine step, by work kind.",
            [*labels, "kind"],
            buckets=STEP_TOKEN_BUCKETS,
            registry=r,
        )
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.")
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between streamed token batches.")
        self.tpot = histogram(
            "vllm:request_time_per_output_token_seconds", "Per request: decode time / token."
        )
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.")
        # A finished request's phases (engine/timeline.py), vLLM's names.
        self.phases = {
            "queue": histogram("vllm:request_queue_time_seconds", "Queued to first scheduled."),
            "prefill": histogram("vllm:request_prefill_time_seconds", "First scheduled to first token."),
            "decode": histogram("vllm:request_decode_time_seconds", "First token to finish."),
            "inference": histogram("vllm:request_inference_time_seconds", "First scheduled to finish."),
            "front": histogram(
                "meshserve:request_front_time_seconds",
                "Arrival to queued (body read, tokenize, wait for a step end).",
            ),
        }
        self.finished = Counter(
            "vllm:request_success",
            "Finished requests, by finish reason.",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.pd = PDMetrics(r)  # per role, when the engine is a prefill/decode pair
        self._last: dict[str, float] = {}  # engine totals at the previous step
        self._token_time: dict[str, float] = {}  # request id -> time of its latest streamed tokens
        self._token_count: dict[str, int] = {}  # request id -> tokens streamed so far
        # Series bound on first use and kept: ``labels()`` takes a lock and a dict lookup, and the engine
        # thread would call it for every output of every step, between two forwards. (Bound lazily, so a
        # series appears in /metrics only once it has been touched, as before.)
        self._series: dict[tuple[str, ...], Any] = {}

    def on_step(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        """Engine-thread hook: read the step's stats and the outputs it produced."""
        now = time.time()
        stats, m = engine.last_stats, self.model
        if getattr(engine, "role_stats", None):
            self.pd.on_step(m, engine.role_stats)
        series = self.series
        series("running").set(stats.get("running", 0))
        series("waiting").set(stats.get("waiting", 0))
        series("kv_usage").set(stats.get("kv_usage", 0.0))
        for kind, n in stats.get("tokens", {}).items():
            if n:
                series("step_tokens", kind).observe(n)
        series("prompt_tokens").inc(stats.get("tokens", {}).get("prefill", 0))
        totals: dict[str, float] = {"preemptions": engine.num_preemptions}
        if engine.blocks.prefix_cache is not None:
            cache = engine.blocks.prefix_cache.stats()
            totals.update(prefix_queries=cache["queried_tokens"], prefix_hits=cache["hit_tokens"])
            self.prefix_hit_rate.labels(m).set(cache["hit_rate"])
        if engine.spec is not None:
            counts = engine.spec.counters()
            totals.update(spec_drafts=counts["draft_tokens"], spec_accepted=counts["accepted_tokens"])
            self.spec_acceptance.labels(m).set(stats.get("spec_acceptance_rate", 0.0))
        for name, total in totals.items():
            getattr(self, name).labels(m).inc(max(0.0, total - self._last.get(name, 0.0)))
            self._last[name] = total
        for out in outputs:
            self._observe(out, now)

    def _observe(self, out: RequestOutput, now: float) -> None:
        rid, series = out.request_id, self.series
        new_tokens = sum(len(c.token_ids) for c in out.outputs)
        series("generation_tokens").inc(new_tokens)
        last, count = self._token_time.get(rid), self._token_count.get(rid, 0)
        timeline = out.metrics.timeline
        if new_tokens:
            if last is None and timeline is not None and timeline.first_token is not None:
                series("ttft").observe(timeline.first_token - timeline.arrival)  # from the front door
            elif last is None and out.metrics.first_token_time is not None:
                series("ttft").observe(out.metrics.first_token_time - out.metrics.arrival_time)
            elif last is not None:
                series("itl").observe(now - last)
            self._token_time[rid], self._token_count[rid] = now, count + new_tokens
        if out.finished:
            self._finish(out, now, count + new_tokens)

    def on_finish(self, out: RequestOutput) -> None:
        """Engine-thread hook: a request AsyncLLM's front door ended (on stop strings), whose tokens
        ``on_step`` has counted; its latencies and finish reasons, as if the engine had ended it."""
        self._finish(out, time.time(), self._token_count.get(out.request_id, 0))

    def _finish(self, out: RequestOutput, now: float, count: int) -> None:
        m = self.model
        self.forget(out.request_id)
        self.e2e.labels(m).observe(now - out.metrics.arrival_time)
        first = out.metrics.first_token_time
        if first is not None and count > 1:
            self.tpot.labels(m).observe((now - first) / (count - 1))
        for c in out.outputs:
            if c.finish_reason:
                self.finished.labels(m, c.finish_reason).inc()
        if out.metrics.timeline is not None:
            for phase, seconds in out.metrics.timeline.phases().items():
                if phase in self.phases:
                    self.phases[phase].labels(m).observe(seconds)

    def series(self, name: str, *labels: str) -> Any:
        """Metric ``name``'s series for this model (and ``labels``), bound once."""
        key = (name, *labels)
        bound = self._series.get(key)
        if bound is None:
            bound = self._series[key] = getattr(self, name).labels(self.model, *labels)
        return bound

    def forget(self, request_id: str) -> None:
        """Drop a request's timing state (it finished, or was aborted and never will)."""
        self._token_time.pop(request_id, None)
        self._token_count.pop(request_id, None)

    @property
    def num_tracked(self) -> int:
        """Requests with timing state held (0 once all have finished or been aborted: nothing leaks)."""
        return len(self._token_time)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), "text/plain; version=0.0.4; charset=utf-8"
