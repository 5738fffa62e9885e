"""ni-eplb's steady state over tokens per device, beside EPLB at the paper's cadence and at vLLM's."""

import dataclasses

import pytest

from meshserve.wafer import reproduce_balance as rb
from meshserve.wafer.balance import BalanceConfig
from meshserve.wafer.steady_curve import break_even_text, dispatch_break_even, ni_steady_curve, ni_steady_png


def small_spec() -> dict:
    """The shipped spec on one 8x8 wafer with DBRX (16 experts), two points, 24 iterations."""
    spec = rb.load_spec()
    on_one_wafer = lambda r: dataclasses.replace(r, hardware="wsc-8x8", mapping="er")  # noqa: E731
    spec["ladder"] = [on_one_wafer(r) for r in spec["ladder"]]
    spec["references"] = [on_one_wafer(r) for r in spec["references"]]
    spec.update(models=["dbrx"], iterations=24)
    spec["curves"]["ni_steady"]["tokens_per_device"] = [16, 256]
    return spec


def test_the_curve_breaks_ni_eplb_down_beside_both_eplb_cadences(tmp_path):
    curve = ni_steady_curve(small_spec(), BalanceConfig(), progress=False)
    assert curve["iterations"] == 24 and [p["tokens_per_device"] for p in curve["points"]] == [16, 256]
    for p in curve["points"]:
        for kind in ("ni_eplb", "ni_eplb_balanced"):
            ours = p[kind]
            # a plan made with hindsight on the scored window balances it at least as well as one made ahead
            assert ours["floor"] <= ours["forecast"] + 1e-9
            assert ours["simulated"] == ours["max_over_mean"] and ours["stall_ms_per_iteration"] == 0.0
        # levelling each iteration lowers the hindsight floor (the joined plan moves loads only a little)
        assert p["ni_eplb_balanced"]["floor"] <= p["ni_eplb"]["floor"] + 1e-6
        assert p["eplb_paper"]["plans"] >= 1 and p["none"]["plans"] == 0
        vllm = p["eplb_vllm"]  # one plan, its stall spread over vLLM's 3,000-step interval
        assert vllm["stall_ms_per_iteration"] * 3000 == pytest.approx(vllm["stall_ms_per_plan"])
    for kind in ("ni_eplb", "ni_eplb_balanced"):
        reached = [p["tokens_per_device"] for p in curve["points"] if p[kind]["simulated"] <= curve["target"]]
        assert curve["target_reached_at_tokens_per_device"][kind] == reached
    assert ni_steady_png(curve, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    even = curve["break_even"]  # the balanced dispatch's saving, in time per layer, with its solve added back
    assert curve["dispatch_solve_us"] == 0.0 and len(even["saving_us_per_layer"]) == 2  # levelled for free
    assert set(even["tokens_per_device"]) == {"0.0", "10.0", "25.0", "50.0", "100.0"}


def test_the_solve_breaks_even_where_the_saving_per_layer_reaches_it():
    def point(tokens, even_ms, balanced_ms):
        return {
            "tokens_per_device": tokens,
            "ni_eplb": {"moe_ms_per_iteration": even_ms},
            "ni_eplb_balanced": {"moe_ms_per_iteration": balanced_ms},
        }

    # 2 layers, levelled with a free solve: they save 50 us a layer at 16 tokens, 200 at 256
    even = dispatch_break_even([point(16, 1.0, 0.9), point(256, 1.0, 0.6)], 2)
    assert even["saving_us_per_layer"] == pytest.approx([50.0, 200.0])
    assert even["tokens_per_device"]["100.0"] == pytest.approx(16 * 16 ** (1 / 3))  # 1/3 of the way in log
    assert even["tokens_per_device"]["0.0"] is None  # pays from the first point on
    saving = even["saving_us_per_layer"]
    assert break_even_text(saving, 0.0, None) == "pays at every batch in range"
    assert break_even_text(saving, 500.0, None) == "never pays in range"
    assert break_even_text(saving, 100.0, 40.3) == "pays from 40 tokens/device"
