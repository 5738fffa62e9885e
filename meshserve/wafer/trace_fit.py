"""Fit a recorded expert-load trace's skew and drift, and scale it up to another model's shape.

A trace recorded on a small model (say 8 experts, 6 layers) says how skewed a learned router is and
how fast its hot experts move; the planner needs the same behaviour on a DeepSeek-V3-sized model.
:func:`fit_popularity` reads the two into :class:`~meshserve.wafer.synthetic.Popularity` (the
"mixed" scenario), and :func:`scaled_trace` draws a trace of any shape from it.

- Skew: the slope of log(long-run share) against log(rank), pooled over layers, is the Zipf
  exponent (share of the rank-r expert ~ r**-zipf_exponent).
- Drift: steps are grouped into windows; a window's log-share deviation from the long-run share is
  drift (correlated across windows) plus noise (not): the lag-1 and lag-2 covariances separate them
  and give drift_sigma and the correlation time (drift_steps = -window / ln(rho)).
Assumptions, stated: the spread of log-shares carries over across expert counts (the exponent is
rescaled so it does), and drift is per step whatever the batch. Both are simple choices an 8-expert
trace cannot refute.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from meshserve.errors import require
from meshserve.traces import ExpertTrace
from meshserve.wafer.synthetic import Popularity, synthetic_trace

MIN_SLOTS_PER_EXPERT = 64  # windows hold at least this many routed slots per expert on average


def long_run_shares(counts: np.ndarray) -> np.ndarray:
    """[layers, experts] share of each layer's routed slots over the whole trace."""
    totals = counts.sum(axis=0).astype(np.float64)
    return totals / np.maximum(totals.sum(axis=1, keepdims=True), 1.0)


def zipf_exponent(shares: np.ndarray) -> float:
    """Least-squares slope of log(share) on log(rank), per layer centred, pooled over layers."""
    ranked = -np.sort(-shares, axis=1)
    log_rank = np.broadcast_to(np.log(np.arange(1, shares.shape[1] + 1)), ranked.shape)
    log_share = np.log(np.maximum(ranked, 1e-9))
    x = log_rank - log_rank.mean(axis=1, keepdims=True)
    y = log_share - log_share.mean(axis=1, keepdims=True)
    return max(0.0, float(-(x * y).sum() / max((x * x).sum(), 1e-12)))


def window_steps(counts: np.ndarray) -> int:
    """Steps per window so that a window averages MIN_SLOTS_PER_EXPERT slots per expert (at least 1)."""
    per_step = counts.sum(axis=2).mean() / counts.shape[2]
    return max(1, int(np.ceil(MIN_SLOTS_PER_EXPERT / max(per_step, 1e-9))))


def drift(counts: np.ndarray, window: int) -> tuple[float, float]:
    """(drift_sigma, drift_steps) from windowed log-share deviations.

    Deviations are drift (an AR(1) across windows: lag-j covariance sigma**2 * rho**j) plus noise that
    is uncorrelated between windows (sampling, and tokens of one request routing alike within a step).
    So the lag-1 and lag-2 covariances give rho = c2 / c1 and sigma**2 = c1**2 / c2, noise excluded.
    """
    n_windows = counts.shape[0] // window
    if n_windows < 4:
        return 0.0, float(max(counts.shape[0], 1))
    win = counts[: n_windows * window].reshape(n_windows, window, *counts.shape[1:]).sum(axis=1)
    slots = win.sum(axis=2, keepdims=True).astype(np.float64)  # [windows, layers, 1]
    share = (win + 0.5) / (slots + 0.5 * counts.shape[2])
    dev = np.log(share) - np.log(share).mean(axis=0, keepdims=True)
    c1, c2 = float((dev[1:] * dev[:-1]).mean()), float((dev[2:] * dev[:-2]).mean())
    if c1 <= 0 or c2 <= 0:
        return 0.0, float(counts.shape[0])
    rho = min(c2 / c1, 0.999)
    return float(np.sqrt(min(c1 / rho, (dev**2).mean()))), float(-window / np.log(rho))


def fit_popularity(trace: ExpertTrace) -> Popularity:
    """The "mixed" Popularity (zipf_exponent, drift_sigma, drift_steps) that best describes the trace."""
    require(trace.num_steps >= 1 and trace.counts.sum() > 0, "trace", "has no routed tokens to fit")
    counts = trace.counts
    sigma, steps = drift(counts, window_steps(counts))
    return Popularity(
        scenario="mixed",
        zipf_exponent=zipf_exponent(long_run_shares(counts)),
        drift_sigma=sigma,
        drift_steps=max(steps, 1.0),
        warmup_steps=0,
    )


def log_rank_spread(num_experts: int) -> float:
    """Standard deviation of log(rank) over ranks 1..num_experts."""
    return float(np.log(np.arange(1, num_experts + 1)).std())


def scaled_trace(
    trace: ExpertTrace,
    *,
    model: str,
    num_layers: int,
    num_experts: int,
    top_k: int,
    tokens_per_step: int,
    steps: int,
    seed: int = 0,
) -> tuple[ExpertTrace, Popularity]:
    """A trace of another model's shape drawn from the recorded trace's fitted skew and drift.

    The skew carried over is the spread of log-shares (std over experts), not the Zipf exponent itself:
    the same exponent over 256 ranks instead of 8 would make the hottest expert far hotter. So the
    exponent is rescaled by the ratio of the two log-rank spreads. Returns (trace, the Popularity drawn).
    """
    fitted = fit_popularity(trace)
    zipf = fitted.zipf_exponent * log_rank_spread(trace.num_experts) / log_rank_spread(num_experts)
    pop = Popularity(
        scenario="mixed",
        zipf_exponent=zipf,
        drift_sigma=fitted.drift_sigma,
        drift_steps=fitted.drift_steps,
        warmup_steps=0,
    )
    scaled = synthetic_trace(
        model=model,
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        tokens_per_step=tokens_per_step,
        steps=steps,
        seed=seed,
        **asdict(pop),
    )
    meta = {
        **scaled.meta,
        "fitted_from": trace.model,
        "fitted_source": trace.source,
        "fitted_zipf_exponent": fitted.zipf_exponent,
    }
    return ExpertTrace(scaled.counts, model, top_k, f"fitted:{trace.model}", meta), pop


def balancedness(counts: np.ndarray) -> dict[str, float]:
    """Max over mean expert load: of the whole trace per layer (mean over layers), and per step."""
    totals = counts.sum(axis=0).astype(np.float64)
    per_layer = totals.max(axis=1) / np.maximum(totals.mean(axis=1), 1e-9)
    busy = counts.sum(axis=2) > 0
    per_step = counts.max(axis=2) / np.maximum(counts.mean(axis=2), 1e-9)
    return {
        "max_over_mean_total": float(per_layer.mean()),
        "max_over_mean_total_worst": float(per_layer.max()),
        "max_over_mean_per_step": float(per_step[busy].mean()) if busy.any() else 0.0,
    }
