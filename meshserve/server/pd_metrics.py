"""Per-role metrics of a prefill/decode pair (engine/pd/): each instance's queue and KV use, and the KV
transfers (count, failures, bytes, seconds), from the instances' latest reports (PDEngine.role_stats)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge

GAUGES = {
    "waiting": ("meshserve:pd_requests_waiting", "Requests waiting on the instance."),
    "running": ("meshserve:pd_requests_running", "Requests running on the instance."),
    "handoffs": ("meshserve:pd_handoffs_pending", "Prefill: requests waiting for their KV transfer."),
    "kv_usage": ("meshserve:pd_kv_cache_usage_perc", "The instance's KV-cache usage: 1 means 100 percent."),
}
# Totals the instances count (monotonic), shown as gauges of the latest report.
TRANSFER = {
    "transfers": ("meshserve:pd_transfers", "KV transfers done."),
    "failures": ("meshserve:pd_transfer_failures", "KV transfer attempts that failed or timed out."),
    "bytes": ("meshserve:pd_transfer_bytes", "KV bytes moved."),
    "seconds": ("meshserve:pd_transfer_seconds", "Seconds spent in KV transfers (offer to ack)."),
    "blocks_skipped": ("meshserve:pd_transfer_blocks_skipped", "Blocks the decode side held already."),
    "cancelled": (
        "meshserve:pd_transfers_cancelled",
        "Offers of requests aborted on their way: nothing sent.",
    ),
}


class PDMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model_name", "role"]
        self.gauges = {
            key: Gauge(name, doc, labels, registry=registry)
            for key, (name, doc) in (GAUGES | TRANSFER).items()
        }

    def on_step(self, model: str, role_stats: dict[str, dict[str, Any]]) -> None:
        for role, stats in role_stats.items():
            for key in GAUGES:
                self.gauges[key].labels(model, role).set(stats.get(key, 0))
            for key in TRANSFER:
                self.gauges[key].labels(model, role).set(stats["transfer"].get(key, 0))
