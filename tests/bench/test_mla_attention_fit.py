"""benchmarks/mla_attention.py --write-profile: the fitted FormCosts are what the engine reads back."""

import importlib.util
from dataclasses import astuple
from pathlib import Path

import numpy as np
import torch

from meshserve.kernels.attention_tiles import profile_key
from meshserve.models.layers.mla import FormCosts, form_costs

BENCH = Path(__file__).parents[2] / "benchmarks" / "mla_attention.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("mla_attention", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fit_recovers_the_weights_and_the_engine_reads_them(tmp_path, switch):
    bench = load_bench()
    truth = FormCosts(absorbed_rows=0.02, absorbed_pairs=0.004, expanded_rows=0.01, expanded_pairs=0.009)
    terms = np.random.default_rng(0).integers(10**6, 10**9, size=(6, 4))
    times = [  # milliseconds, as the benchmark measures them
        (
            (truth.absorbed_rows * a_rows + truth.absorbed_pairs * a_pairs) / 1e6,
            (truth.expanded_rows * e_rows + truth.expanded_pairs * e_pairs) / 1e6,
        )
        for a_rows, a_pairs, e_rows, e_pairs in terms.tolist()
    ]
    costs = bench.fit_costs(terms.tolist(), times)
    np.testing.assert_allclose(astuple(costs), astuple(truth), rtol=1e-6)
    switch("MESHSERVE_PROFILE_DIR", str(tmp_path))
    bench.write_profile(tmp_path / "mla.json", costs, [{"rows": 64}])
    form_costs.cache_clear()
    try:
        assert form_costs(bench.WIDTH, torch.bfloat16) == costs
        assert profile_key(bench.WIDTH, torch.bfloat16).endswith("/bfloat16/d576")
    finally:
        form_costs.cache_clear()
