"""Fitting a trace's skew and drift, and scaling it to another model's shape."""

import numpy as np
import pytest

from meshserve.errors import InputError
from meshserve.traces import ExpertTrace
from meshserve.wafer.synthetic import synthetic_trace
from meshserve.wafer.trace_fit import balancedness, fit_popularity, long_run_shares, scaled_trace


def small_trace(zipf: float, sigma: float, drift_steps: float, seed: int = 1) -> ExpertTrace:
    return synthetic_trace(
        model="tiny",
        num_layers=4,
        num_experts=8,
        top_k=2,
        tokens_per_step=64,
        steps=800,
        seed=seed,
        scenario="mixed",
        zipf_exponent=zipf,
        drift_sigma=sigma,
        drift_steps=drift_steps,
        warmup_steps=0,
    )


@pytest.mark.parametrize("zipf", [0.0, 0.5, 1.0])
def test_fit_recovers_the_skew_of_a_trace_without_drift(zipf):
    pop = fit_popularity(small_trace(zipf, 0.0, 100.0))
    assert pop.zipf_exponent == pytest.approx(zipf, abs=0.05)
    assert pop.drift_sigma < 0.05


def test_fit_recovers_drift_size_and_time():
    pop = fit_popularity(small_trace(0.3, 0.4, 60.0))
    assert pop.drift_sigma == pytest.approx(0.4, abs=0.12)
    assert 25 < pop.drift_steps < 150


def test_more_drift_fits_larger_sigma():
    calm, busy = (fit_popularity(small_trace(0.3, s, 60.0)) for s in (0.1, 0.6))
    assert busy.drift_sigma > calm.drift_sigma + 0.3


def test_scaled_trace_has_the_new_shape_and_similar_skew():
    recorded = small_trace(0.8, 0.0, 100.0)
    scaled, pop = scaled_trace(
        recorded, model="deepseek-v3", num_layers=3, num_experts=256, top_k=8, tokens_per_step=4096, steps=20
    )
    assert scaled.counts.shape == (20, 3, 256)
    assert scaled.model == "deepseek-v3" and scaled.source == "fitted:tiny"
    assert (scaled.counts.sum(axis=2) == 4096 * 8).all()
    # the spread of log-shares carries over, not the exponent (over 256 ranks it would be far hotter)
    assert pop.zipf_exponent < fit_popularity(recorded).zipf_exponent
    spread = [np.log(long_run_shares(t.counts)).std(axis=1).mean() for t in (recorded, scaled)]
    assert spread[1] == pytest.approx(spread[0], rel=0.2)


def test_balancedness_is_one_when_uniform_and_grows_with_skew():
    uniform = np.full((5, 2, 8), 10)
    assert balancedness(uniform)["max_over_mean_total"] == pytest.approx(1.0)
    skewed = balancedness(small_trace(1.0, 0.0, 100.0).counts)
    assert skewed["max_over_mean_total"] > 2.0


def test_an_empty_trace_cannot_be_fitted():
    with pytest.raises(InputError, match="trace"):
        fit_popularity(ExpertTrace(np.zeros((3, 2, 8), dtype=np.int64), "tiny", 2, "engine"))
