"""Transfer counters: how many, how many failed, bytes and seconds (each transfer's, for percentiles)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

HISTORY = 4096  # transfers kept for percentiles


@dataclass
class TransferStats:
    transfers: int = 0
    failures: int = 0
    blocks_sent: int = 0
    blocks_skipped: int = 0  # held by the decode side's prefix cache: not sent
    cancelled: int = 0  # offers of requests aborted before the decode side took them: nothing sent
    bytes: int = 0
    seconds: float = 0.0
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))  # (bytes, seconds) per transfer

    def record(self, sent: int, skipped: int, nbytes: int, seconds: float) -> None:
        self.transfers += 1
        self.blocks_sent += sent
        self.blocks_skipped += skipped
        self.bytes += nbytes
        self.seconds += seconds
        self.history.append((nbytes, seconds))

    def summary(self) -> dict[str, float]:
        """Totals and per-transfer mean / p99 of bytes and latency."""
        rows = np.array(self.history, dtype=float).reshape(-1, 2)
        out: dict[str, float] = {
            "transfers": self.transfers,
            "failures": self.failures,
            "blocks_sent": self.blocks_sent,
            "blocks_skipped": self.blocks_skipped,
            "cancelled": self.cancelled,
            "bytes": self.bytes,
            "seconds": self.seconds,
        }
        if len(rows):
            out |= {
                "bytes_mean": float(rows[:, 0].mean()),
                "latency_mean_s": float(rows[:, 1].mean()),
                "latency_p99_s": float(np.percentile(rows[:, 1], 99)),
            }
        return out
