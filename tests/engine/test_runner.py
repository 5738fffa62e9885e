"""runner.pad_tables: ragged block tables -> one array padded with PAD_BLOCK, as a row-by-row copy."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from meshserve.engine.runner import pad_tables
from meshserve.models.batch import PAD_BLOCK


@given(st.lists(st.lists(st.integers(0, 10_000), max_size=9), min_size=1, max_size=12))
def test_pad_tables_matches_a_row_by_row_copy(tables):
    expected = np.full((len(tables), max(map(len, tables))), PAD_BLOCK, dtype=np.int64)
    for i, table in enumerate(tables):
        expected[i, : len(table)] = table
    got = pad_tables(tables)
    assert got.dtype == np.int64 and np.array_equal(got, expected)
