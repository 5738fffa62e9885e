"""count_true and true_indices: numpy's bool sum and nonzero, the same arrays, faster."""

import numpy as np

from meshserve.placement.plan import count_true, true_indices


def test_count_true_and_true_indices_match_numpy_on_tables_and_views():
    rng = np.random.default_rng(0)
    holds = rng.random((3, 7, 5)) < 0.3
    for mask in (holds, holds.transpose(0, 2, 1), holds[:, ::2], holds[1]):
        for axis in range(mask.ndim):
            got = count_true(mask, axis)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, mask.sum(axis=axis))
        for got, want in zip(true_indices(mask), np.nonzero(mask), strict=True):
            np.testing.assert_array_equal(got, want)
    assert count_true(np.ones((2, 70000), dtype=bool), 1).tolist() == [70000, 70000]  # past uint16
