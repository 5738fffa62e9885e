"""Seeded synthetic expert-load traces: skewed (Zipf-like) popularity with temporal drift.

Each MoE layer ranks its experts in a random order and gives rank r the log-popularity
``-zipf_exponent * log(r)``. A perturbation in log space moves that over time:

- ``fixed``: the perturbation slides from one random state to another (both of std
  ``drift_sigma``) with time constant ``warmup_steps / 3``, so loads settle after warm-up and then
  stay put (the paper's "fixed" scenario: one request mix, stable routing).
- ``mixed``: the perturbation is a stationary Ornstein-Uhlenbeck process (std ``drift_sigma``,
  correlation time ``drift_steps``, drawn every drift_steps/20 steps and interpolated), so hot
  experts change slowly (the "mixed" scenario).

A token goes to ``top_k`` distinct experts, so no expert can get more than 1/top_k of a layer's
routed slots; probabilities are capped there (water-filling) before the multinomial draw.
Everything is one vectorised draw over [steps, layers, experts].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy.signal import lfilter

from meshserve.errors import require
from meshserve.traces import ExpertTrace

SCENARIOS = ("fixed", "mixed")


def cap_probabilities(p: np.ndarray, cap: float, iterations: int = 64) -> np.ndarray:
    """Clip probabilities (last axis sums to 1) at ``cap`` and hand the excess to the others."""
    p = np.array(p, dtype=np.float64)
    for _ in range(iterations):
        over = p > cap * (1 + 1e-12)
        if not over.any():
            break
        capped = np.where(over, cap, p)
        at_cap = capped >= cap * (1 - 1e-12)
        free = np.where(at_cap, 0.0, capped)
        room = 1.0 - at_cap.sum(axis=-1, keepdims=True) * cap
        p = np.where(at_cap, cap, free * room / np.maximum(free.sum(axis=-1, keepdims=True), 1e-300))
    return p


@dataclass(frozen=True)
class Popularity:
    """How routing popularity looks and moves (see the module docstring for the two scenarios).

    zipf_exponent 0 and drift_sigma 0 is uniform routing. The defaults (0.1, 0.2) give a hottest
    expert about 2x the mean on 256 experts, the skew the paper reports for unbalanced decode
    (its Fig. 15); see docs/wafer.md.
    """

    scenario: str = "fixed"
    zipf_exponent: float = 0.1
    drift_sigma: float = 0.2
    drift_steps: float = 200.0
    warmup_steps: int = 30

    def __post_init__(self) -> None:
        require(
            self.scenario in SCENARIOS,
            "scenario",
            f"unknown {self.scenario!r}; allowed: {', '.join(SCENARIOS)}",
        )
        require(self.zipf_exponent >= 0, "zipf_exponent", f"must be >= 0, got {self.zipf_exponent}")
        require(self.drift_sigma >= 0, "drift_sigma", f"must be >= 0, got {self.drift_sigma}")
        require(self.drift_steps > 0, "drift_steps", f"must be > 0, got {self.drift_steps}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")

    def probabilities(
        self, steps: int, num_layers: int, num_experts: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Routing probabilities [steps, layers, experts] (each row sums to 1)."""
        ranks = np.argsort(rng.random((num_layers, num_experts)), axis=1) + 1
        base = -self.zipf_exponent * np.log(ranks)
        sigma = np.float32(self.drift_sigma)
        if self.scenario == "fixed":
            t = np.arange(steps, dtype=np.float32)[:, None, None]
            start, end = rng.standard_normal((2, 1, num_layers, num_experts), dtype=np.float32)
            fade = np.exp(-t / (max(self.warmup_steps, 1) / 3.0))
            perturb = sigma * (fade * start + np.sqrt(1 - fade**2) * end)
        else:
            # AR(1) with stationary std drift_sigma on a grid of ``stride`` steps (the drift is
            # slow, so nothing is lost), linearly interpolated in between.
            stride = max(1, int(self.drift_steps // 20))
            coarse = -(-steps // stride) + 1
            rho = np.float32(np.exp(-stride / self.drift_steps))
            noise = rng.standard_normal((coarse, num_layers, num_experts), dtype=np.float32)
            innov = noise * sigma * np.sqrt(1 - rho**2)
            innov[0] = noise[0] * sigma
            grid = lfilter(np.array([1.0], np.float32), np.array([1.0, -rho], np.float32), innov, axis=0)
            pos = np.arange(steps) / stride
            i, w = pos.astype(np.int64), (pos % 1).astype(np.float32)[:, None, None]
            perturb = grid[i] * (1 - w) + grid[i + 1] * w
        logits = base[None].astype(np.float32) + perturb
        logits -= logits.max(axis=2, keepdims=True)
        p = np.exp(logits, dtype=np.float64)
        return p / p.sum(axis=2, keepdims=True)


def synthetic_trace(
    *,
    model: str,
    num_layers: int,
    num_experts: int,
    top_k: int,
    tokens_per_step: int,
    steps: int,
    seed: int = 0,
    **popularity: Any,
) -> ExpertTrace:
    """Draw a trace: ``tokens_per_step`` tokens each routed to ``top_k`` experts per layer and step.

    ``popularity``: fields of :class:`Popularity` (scenario, zipf_exponent, drift_sigma,
    drift_steps, warmup_steps). Same arguments and seed give the same counts.
    """
    require(steps >= 1, "steps", f"must be >= 1, got {steps}")
    require(num_layers >= 1, "num_layers", f"must be >= 1, got {num_layers}")
    require(num_experts >= 1, "num_experts", f"must be >= 1, got {num_experts}")
    require(1 <= top_k <= num_experts, "top_k", f"must be in [1, {num_experts}], got {top_k}")
    require(tokens_per_step >= 1, "tokens_per_step", f"must be >= 1, got {tokens_per_step}")
    unknown = set(popularity) - {f.name for f in fields(Popularity)}
    require(not unknown, "popularity", f"unknown {sorted(unknown)}; allowed: Popularity fields")
    shape = Popularity(**popularity)
    rng = np.random.default_rng(seed)
    p = cap_probabilities(shape.probabilities(steps, num_layers, num_experts, rng), 1.0 / top_k)
    counts = rng.multinomial(tokens_per_step * top_k, p)
    meta = {**asdict(shape), "seed": seed, "tokens_per_step": tokens_per_step}
    source = f"synthetic:{shape.scenario}"
    return ExpertTrace(counts=counts, model=model, top_k=top_k, source=source, meta=meta)
