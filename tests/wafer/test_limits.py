"""Problem sizes are estimated before allocating: what is accepted fits the budget, what is not is refused
at once with the estimate printed."""

from __future__ import annotations

import time
import tracemalloc

import pytest
import yaml

from meshserve.errors import InputError
from meshserve.testing import run_cli
from meshserve.wafer import topology
from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.limits import (
    ENV_BUDGET,
    budget_bytes,
    check_iterations,
    iteration_bytes,
    largest_square_mesh,
    topology_bytes,
)
from meshserve.wafer.mapping import make_mapping
from meshserve.wafer.models import load_model
from meshserve.wafer.presets import PRESET_DIR
from meshserve.wafer.simulate import simulate_layer

SMALL_BUDGET_GIB = 0.125


def peak_bytes(fn) -> int:
    """Peak bytes Python and numpy allocate while ``fn`` runs (caches cleared first)."""
    topology.topology_for.cache_clear()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        topology.topology_for.cache_clear()


def mesh_yaml(tmp_path, k: int) -> str:
    """A k x k mesh of the bundled wsc-8x8 dies and links, as a hardware YAML file."""
    data = yaml.safe_load((PRESET_DIR / "hardware" / "wsc-8x8.yaml").read_text())
    data["name"] = f"wsc-{k}x{k}"
    data["mesh"].update(rows=k, cols=k)
    path = tmp_path / f"wsc-{k}x{k}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(("k", "tp"), [(4, 4), (8, 4), (16, 4), (20, 4)])
def test_the_estimate_covers_the_measured_peak(k, tp):
    hw, model = load_hardware("wsc-8x8").with_mesh(k, k), load_model("deepseek-v3")
    peak = peak_bytes(lambda: simulate_layer(hw, model, make_mapping(hw, tp, "er"), 64))
    assert peak <= topology_bytes(hw)


@pytest.mark.parametrize(
    "budget_gib",
    [
        SMALL_BUDGET_GIB,
        pytest.param(None, marks=pytest.mark.slow, id="default-budget"),  # 37x37 dies: ~1 min, ~3 GB
    ],
)
def test_the_largest_accepted_mesh_runs_within_the_budget_and_one_larger_is_refused_at_once(
    tmp_path, monkeypatch, budget_gib
):
    if budget_gib is None:
        monkeypatch.delenv(ENV_BUDGET, raising=False)
    else:
        monkeypatch.setenv(ENV_BUDGET, str(budget_gib))
    hw = load_hardware("wsc-8x8")
    k = largest_square_mesh(hw)
    assert k >= 8
    accepted = mesh_yaml(tmp_path, k)
    peak = peak_bytes(lambda: run_cli(["wafer", "simulate", "--hardware", accepted, "--tp", "1"]))
    assert peak <= budget_bytes()
    start = time.perf_counter()
    result = run_cli(["wafer", "simulate", "--hardware", mesh_yaml(tmp_path, k + 1), "--tp", "1"])
    assert time.perf_counter() - start < 1.0
    assert result.code == 2 and result.err.startswith("error: hardware: ") and "GiB" in result.err
    assert f"largest square mesh that fits: {k}x{k}" in result.err


def test_too_many_iterations_are_refused_with_the_estimate(monkeypatch):
    monkeypatch.setenv(ENV_BUDGET, str(SMALL_BUDGET_GIB))
    hw, model = load_hardware("wsc-8x8"), load_model("deepseek-v3")
    check_iterations(hw, 10, model.num_moe_layers, model.routed_experts)
    with pytest.raises(InputError) as err:
        check_iterations(hw, 10**7, model.num_moe_layers, model.routed_experts)
    estimate = iteration_bytes(hw, 10**7, model.num_moe_layers, model.routed_experts) / (1 << 30)
    assert err.value.field == "iterations" and f"{estimate:.1f} GiB" in err.value.message


@pytest.mark.parametrize("value", ["0", "-1", "nan", "lots"])
def test_a_bad_budget_setting_is_named(monkeypatch, value):
    monkeypatch.setenv(ENV_BUDGET, value)
    with pytest.raises(InputError) as err:
        budget_bytes()
    assert err.value.field == ENV_BUDGET


def test_the_iteration_estimate_covers_the_measured_peak():
    from meshserve.wafer.balance_setup import BalanceSetup, comm_model, run_setup

    comm_model.cache_clear()
    setup = BalanceSetup(model="deepseek-v3", hardware="wsc-8x8", iterations=30, balancer="ni")
    peak = peak_bytes(lambda: run_setup(setup))
    comm_model.cache_clear()
    model = load_model("deepseek-v3")
    assert peak <= iteration_bytes(load_hardware("wsc-8x8"), 30, model.num_moe_layers, model.routed_experts)
