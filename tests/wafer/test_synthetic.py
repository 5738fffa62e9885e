"""Synthetic expert-load traces: seeded, skewed, drifting the way each scenario says."""

import numpy as np
import pytest

from meshserve.errors import InputError
from meshserve.wafer.synthetic import cap_probabilities, synthetic_trace


def trace(**kw):
    args = dict(model="tiny", num_layers=4, num_experts=32, top_k=4, tokens_per_step=256, steps=120, seed=3)
    return synthetic_trace(**{**args, **kw})


def test_same_seed_same_counts_other_seed_differs():
    np.testing.assert_array_equal(trace().counts, trace().counts)
    assert not np.array_equal(trace().counts, trace(seed=4).counts)


def test_every_step_routes_tokens_times_top_k_per_layer():
    t = trace(scenario="mixed")
    assert t.counts.shape == (120, 4, 32)
    assert (t.counts.sum(axis=2) == 256 * 4).all()
    np.testing.assert_allclose(t.tokens_per_step(), 256)
    assert t.source == "synthetic:mixed" and t.meta["seed"] == 3


def test_zipf_exponent_controls_skew():
    flat = trace(zipf_exponent=0.0, drift_sigma=0.0, tokens_per_step=4096).counts
    skewed = trace(zipf_exponent=1.0, drift_sigma=0.0, tokens_per_step=4096).counts
    ratio = lambda c: (c.max(axis=2) / c.mean(axis=2)).mean()  # noqa: E731
    assert ratio(flat) < 1.3 < 2.0 < ratio(skewed)


def test_fixed_settles_after_warmup_and_mixed_keeps_drifting():
    def drift(t, a, b):
        p = t.counts[:, 0].astype(float)
        p /= p.sum(axis=1, keepdims=True)
        return np.abs(p[a : a + 10].mean(0) - p[b : b + 10].mean(0)).sum()

    fixed = trace(scenario="fixed", warmup_steps=30, steps=400, tokens_per_step=4096)
    mixed = trace(scenario="mixed", drift_steps=100, steps=400, tokens_per_step=4096)
    assert drift(fixed, 0, 40) > 2 * drift(fixed, 100, 390)
    assert drift(mixed, 100, 390) > 2 * drift(fixed, 100, 390)


def test_no_expert_gets_more_than_one_slot_per_token():
    p = cap_probabilities(np.array([[0.7, 0.2, 0.05, 0.05]]), 0.5)
    np.testing.assert_allclose(p.sum(), 1.0)
    assert p.max() <= 0.5 + 1e-12


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"scenario": "bursty"}, "scenario"),
        ({"top_k": 0}, "top_k"),
        ({"steps": 0}, "steps"),
        ({"zipf_exponent": -1.0}, "zipf_exponent"),
    ],
)
def test_bad_arguments_name_the_field(kw, field):
    with pytest.raises(InputError) as err:
        trace(**kw)
    assert err.value.field == field
