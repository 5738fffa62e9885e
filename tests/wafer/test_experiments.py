"""The reproduce-comm sweep on a reduced definition: the open question's hottest-link growth."""

import pytest

from meshserve.wafer.experiments import comparison, load_spec, open_question, summary


@pytest.fixture(scope="module")
def small_spec():
    spec = load_spec()
    spec["models"] = ["deepseek-v3"]
    spec["scales"] = [{"hardware": "wsc-8x8", "rows": 4, "cols": 4}, {"hardware": "wsc-8x8"}]
    spec["open_question"].update(mesh_sides=[4, 8, 16], tp=[4], top_k=[8], tokens_per_device=[64])
    return spec


def test_entwined_rings_grow_with_the_mesh_and_balanced_rings_halve_them(small_spec):
    growth = open_question(small_spec, "bottleneck")["growth"]
    assert [g["mesh"] for g in growth] == ["4x4", "8x8", "16x16"]
    assert [round(g["er_allreduce_hot_ratio"], 6) for g in growth] == [2, 4, 8]
    assert [round(g["er-bal_allreduce_hot_ratio"], 6) for g in growth] == [1, 2, 4]
    assert all(round(g["er_dispatch_hot_ratio"], 6) == 0.5 for g in growth)


def test_summary_reports_fractions_beside_the_paper(small_spec):
    rows = comparison(small_spec, 64, "bottleneck")
    result = summary(rows, open_question(small_spec, "bottleneck"), small_spec)
    assert result["er_reduction_max"] == max(r["reduction"]["er"] for r in rows)
    assert result["er_a2a_reduction_max"] == max(r["a2a_reduction"]["er"] for r in rows)
    assert result["er_a2a_reduction_max"] == pytest.approx(0.5, abs=0.05)  # ER halves the all-to-all
    assert result["her_reduction_max"] is None  # no multi-wafer scale in this reduced sweep
    assert result["er_bal_reduction_max"] > result["er_reduction_max"]
    assert result["paper"]["er_reduction_max"] == 0.35 and result["paper"]["her_reduction_max"] == 0.62
